from maskaq_deploy.cli import main

main()
