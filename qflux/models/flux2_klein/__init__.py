"""FLUX.2 [klein]: multi-reference image editing (Qwen3 text encoder, Flux2 transformer and VAE)."""
