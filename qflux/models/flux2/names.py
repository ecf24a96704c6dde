"""FLUX.2's ComfyUI names (BFL's, as ComfyUI loads FLUX.2 and diffusers' own FLUX.2 converter reads them)."""

from __future__ import annotations

from qflux.lora.formats import BFL_ATTENTION, BFL_ENDS, BFL_SWAPPED, ComfyNames, Target, renamed

NAMING = "flux2"
"""The name FLUX.2 [klein]'s LoRA files are written and read under."""

# BFL's names, which are ComfyUI's own module names for the model (comfy/ldm/flux/model.py with
# ``global_modulation``: double_blocks / single_blocks / final_layer, img_in, txt_in, time_in and the
# shared double_stream_modulation_img / _txt and single_stream_modulation, each a Modulation with
# ``.lin``), so ComfyUI's generic ``diffusion_model.<name>`` LoRA keys reach them; diffusers' own FLUX.2
# converter (``_convert_non_diffusers_flux2_lora_to_diffusers``) maps the same pairs back. The double
# blocks' q/k/v fuse as in FLUX.1; a single block's q/k/v/MLP projection is already fused in diffusers.
DOUBLE: dict[str, Target] = {
    **BFL_ATTENTION,
    **renamed(
        {
            "ff.linear_in": "img_mlp.0",
            "ff.linear_out": "img_mlp.2",
            "ff_context.linear_in": "txt_mlp.0",
            "ff_context.linear_out": "txt_mlp.2",
        }
    ),
}
SINGLE: dict[str, Target] = renamed({"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"})
TOP = {
    **BFL_ENDS,
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}

NAMES = ComfyNames(
    DOUBLE,
    SINGLE,
    TOP,
    swapped=BFL_SWAPPED,
    # ComfyUI's Flux key map (comfy/utils.py flux_to_diffusers) has FLUX.2's block names but FLUX.1's top-level
    # ones only: the shared ends are; the time embedder and the shared modulations are not there
    known_top=frozenset(BFL_ENDS),
    label="FLUX.2",
)
