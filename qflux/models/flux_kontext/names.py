"""FLUX.1's ComfyUI names: the original (BFL) module of each diffusers module, which ComfyUI's own Flux model
uses (comfy/ldm/flux/model.py) and its ``diffusion_model.<name>`` LoRA keys reach. Double-block q/k/v fuse into
``img_attn.qkv`` / ``txt_attn.qkv``, a single block's q/k/v/MLP into ``linear1``; the final modulation's halves
are swapped (:mod:`qflux.lora.formats`)."""

from __future__ import annotations

from qflux.lora.formats import BFL_ATTENTION, BFL_ENDS, BFL_SWAPPED, ComfyNames, fused, renamed

NAMING = "flux"
"""The name FLUX.1 Kontext's LoRA files are written and read under."""

# diffusers module → (BFL module, part index, number of parts), inside a double block and a single block
DOUBLE = {
    **BFL_ATTENTION,
    **renamed(
        {
            "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2",
            "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin",
        }
    ),
}
SINGLE = {
    **fused("linear1", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    **renamed({"proj_out": "linear2", "norm.linear": "modulation.lin"}),
}
TOP = {
    **BFL_ENDS,
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
}

NAMES = ComfyNames(
    DOUBLE,
    SINGLE,
    TOP,
    swapped=BFL_SWAPPED,
    known_top=frozenset(TOP),  # comfy/utils.py flux_to_diffusers: FLUX.1's top-level names
    label="Flux",
)
