"""FLUX.1's ComfyUI names: the original (BFL) module of each diffusers module, which ComfyUI's own Flux model
uses (comfy/ldm/flux/model.py) and its ``diffusion_model.<name>`` LoRA keys reach. Double-block q/k/v fuse into
``img_attn.qkv`` / ``txt_attn.qkv``, a single block's q/k/v/MLP into ``linear1``; the final modulation's halves
are swapped (:mod:`qflux.lora.formats`)."""

from __future__ import annotations

from qflux.lora.formats import ComfyNames

NAMING = "flux"
"""The name FLUX.1 Kontext's LoRA files are written and read under."""

# diffusers module (inside a double block) → (BFL module, part index, number of parts)
DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 3),
    "attn.to_k": ("img_attn.qkv", 1, 3),
    "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.net.0.proj": ("img_mlp.0", 0, 1),
    "ff.net.2": ("img_mlp.2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, 1),
    "ff_context.net.2": ("txt_mlp.2", 0, 1),
    "norm1.linear": ("img_mod.lin", 0, 1),
    "norm1_context.linear": ("txt_mod.lin", 0, 1),
}
SINGLE = {
    "attn.to_q": ("linear1", 0, 4),
    "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", 0, 1),
    "norm.linear": ("modulation.lin", 0, 1),
}
TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}

NAMES = ComfyNames(
    DOUBLE,
    SINGLE,
    TOP,
    swapped=frozenset({"final_layer.adaLN_modulation.1"}),
    known_top=frozenset(TOP),  # comfy/utils.py flux_to_diffusers: FLUX.1's top-level names
    label="Flux",
)
