"""maskaq-deploy: data-free quantization (MaskAQ) and edge deployment for timm Vision Transformers."""

__version__ = "0.1.0"
