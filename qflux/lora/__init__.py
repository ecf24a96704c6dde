"""Adapters: injecting LoRA, DoRA, LoKr and LoHa through peft, their files, and the ComfyUI and kohya names."""

from qflux.lora.adapter import inject_lora, load_lora_file, save_lora, save_lora_comfyui

__all__ = ["inject_lora", "load_lora_file", "save_lora", "save_lora_comfyui"]
