"""LoRA files in other trainers' formats: ComfyUI's native Flux naming, kohya's, and back.

Our LoRA is diffusers' format: ``transformer.<module>.lora_A.weight`` [r, in] and ``lora_B.weight``
[out, r] with the peft config (``lora_alpha``) in the metadata, applied as ΔW = (α/r)·B·A.

ComfyUI loads Flux LoRAs keyed by the original (BFL) module names under ``diffusion_model.``, in
kohya's down/up naming with a per-module ``.alpha`` (ComfyUI ``comfy/lora.py``; diffusers reads
the same files through ``_convert_kohya_flux_lora_to_diffusers``):

    diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight   [r', in]
    diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight     [out', r']
    diffusion_model.double_blocks.0.img_attn.qkv.alpha              α'        ΔW = (α'/r')·up·down

The original model fuses some diffusers layers: ``img_attn.qkv`` = [to_q; to_k; to_v] and a single
block's ``linear1`` = [to_q; to_k; to_v; proj_mlp]. A fused LoRA stacks the parts' ``down``
matrices (rank r' = Σ r) and places each ``up`` on the block diagonal (zero rows for a part without
a LoRA); α' = r'·(α/r) keeps the scale, so ΔW of every part is unchanged. Kohya files are the same
tensors keyed ``lora_unet_<path with dots as underscores>``.

ComfyUI's Qwen-Image model uses diffusers' own module names, so a Qwen-Image-Edit LoRA keeps its
names under ``diffusion_model.`` (:func:`same_module`), nothing fused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

Params = dict[str, torch.Tensor]

# diffusers module (inside a double block) → (BFL module, part index, number of parts)
_DOUBLE = {
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
_SINGLE = {
    "attn.to_q": ("linear1", 0, 4),
    "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", 0, 1),
    "norm.linear": ("modulation.lin", 0, 1),
}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def bfl_target(module: str) -> tuple[str, int, int]:
    """(BFL module, part, parts) of a diffusers Flux module path, or raise naming the module."""
    m = _BLOCK.match(module)
    if m:
        kind, i, rest = m.groups()
        table, prefix = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
        if rest in table:
            name, part, parts = table[rest]
            return f"{prefix}.{i}.{name}", part, parts
    elif module in _TOP:
        return _TOP[module], 0, 1
    raise ValueError(f"no ComfyUI (BFL) name for the Flux module '{module}'")


def _split_modules(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A [r, in], B [out, r])} from diffusers keys ``transformer.<m>.lora_A.weight``."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in sd.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            out[module] = (a, sd[key.replace(".lora_A.", ".lora_B.")])
    return out


def same_module(module: str) -> tuple[str, int, int]:
    """(module, 0, 1): ComfyUI names the module as diffusers does (Qwen-Image)."""
    return module, 0, 1


def flux_to_comfyui(
    sd: Mapping[str, torch.Tensor],
    *,
    scale: float,
    out_features: Callable[[str], int],
    target_of: Callable[[str], tuple[str, int, int]] = bfl_target,
) -> Params:
    """Convert our diffusers-format LoRA to ComfyUI's native naming (see the module docstring).

    Args:
        sd: ``transformer.<module>.lora_{A,B}.weight`` tensors.
        scale: α/r of the adapter (ΔW = scale·B·A).
        out_features: output width of a diffusers module path (to size zero blocks of fused layers).
        target_of: diffusers module → (ComfyUI module, part, parts); Flux's BFL names by default,
            :func:`same_module` for Qwen-Image.

    Returns:
        ``diffusion_model.<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` tensors.
    """
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    parts_of: dict[str, list[str]] = {}
    for module, ab in _split_modules(sd).items():
        target, part, parts = target_of(module)
        groups.setdefault(target, {})[part] = ab
        parts_of.setdefault(target, [""] * parts)[part] = module
    out: Params = {}
    for target, members in groups.items():
        names = parts_of[target]
        parts = len(names)
        a0 = next(iter(members.values()))[0]
        if parts == 1:
            down, up = members[0]
        else:
            present = sorted(members)
            down = torch.cat([members[p][0] for p in present])  # [Σr, in]
            widths = [
                members[p][1].shape[0] if p in members else out_features(_part_module(names, target, p))
                for p in range(parts)
            ]
            up = a0.new_zeros(sum(widths), down.shape[0])
            row = col = 0
            for p in range(parts):
                if p in members:
                    b = members[p][1]
                    up[row : row + b.shape[0], col : col + b.shape[1]] = b
                    col += b.shape[1]
                row += widths[p]
        rank = down.shape[0]
        key = f"diffusion_model.{target}"
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(scale * rank, dtype=down.dtype)
    return out


def _part_module(names: list[str], target: str, part: int) -> str:
    """The diffusers module path of part ``part`` of a fused BFL layer (for its width)."""
    if names[part]:
        return names[part]
    prefix = "transformer_blocks" if target.startswith("double_blocks") else "single_transformer_blocks"
    index = target.split(".")[1]
    table = _DOUBLE if prefix == "transformer_blocks" else _SINGLE
    stem = target.split(".", 2)[2]
    rest = next(r for r, (name, p, _) in table.items() if name == stem and p == part)
    return f"{prefix}.{index}.{rest}"


def comfyui_to_kohya(sd: Mapping[str, torch.Tensor]) -> Params:
    """The same tensors under kohya's ``lora_unet_<path_with_underscores>`` keys."""
    out: Params = {}
    for key, t in sd.items():
        module, _, leaf = key.removeprefix("diffusion_model.").rpartition(".")
        if leaf == "weight":  # lora_down.weight / lora_up.weight
            module, _, kind = module.rpartition(".")
            leaf = f"{kind}.weight"
        out[f"lora_unet_{module.replace('.', '_')}.{leaf}"] = t
    return out


def module_out_features(transformer: Any) -> Callable[[str], int]:
    """``out_features`` of a module path of ``transformer`` (through a peft wrapper's base layer)."""

    def width(path: str) -> int:
        m = transformer.get_submodule(path)
        return int(getattr(m, "out_features", None) or m.base_layer.out_features)

    return width
