"""qflux: LoRA fine-tuning for image-editing diffusion models (FLUX.1 Kontext, Qwen-Image-Edit).

The library is frozen ``attrs`` records and pure functions; recipes in ``recipes/`` compose them.
"""

__version__ = "0.1.0"
