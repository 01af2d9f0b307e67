"""``python -m maskaq_deploy``: the maskaq-deploy command line (also the entry point torchrun starts in every
process: ``torchrun --nproc_per_node N -m maskaq_deploy calibrate ...``)."""

from maskaq_deploy.cli import main

main()
