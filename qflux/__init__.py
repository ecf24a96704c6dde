"""qflux: LoRA fine-tuning for image-editing diffusion models: FLUX.1 Kontext, Qwen-Image-Edit (Edit, 2509,
2511) and FLUX.2 [klein].

The library is frozen ``attrs`` records and pure functions; recipes in ``recipes/`` compose them. The map
(``docs/architecture/README.md``): ``config``, ``data``, ``diffusion``, ``weights``, ``lora``, ``optim``,
``train``, ``memory`` (the planner) and ``models`` (one folder per family). The functions a reader looks
for first: ``qflux.models.<family>.encode_prompt``, ``qflux.diffusion.flow_match_loss`` and
``qflux.train.train_step``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
