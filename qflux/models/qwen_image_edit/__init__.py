"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (2509): the model-specific parts on the shared core."""
