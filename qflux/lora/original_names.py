"""A transformer's weights in its original (BFL) names, the layout of BFL's and ComfyUI's single-file checkpoints:
the inverse of diffusers' ``from_single_file`` converters, built from the family's ComfyUI name table
(:class:`qflux.lora.formats.ComfyNames`), which already maps every linear layer (LoRA files use it).

    diffusers <module>.weight / .bias      → BFL <target>.weight / .bias, the parts of a fused target (q, k, v,
                                              the MLP's input) stacked in its order, a swapped target's halves
                                              exchanged (the final modulation: diffusers (scale, shift), BFL
                                              (shift, scale))
    diffusers <block>.attn.norm_q.weight   → BFL <block>.img_attn.norm.query_norm.scale (and key, text, single)

A model whose ComfyUI names are diffusers' own (Qwen-Image) is written as it is.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from qflux.lora.formats import BLOCK_PATH, NAMINGS, Naming, comfy_target

BFL_NORMS = {
    "transformer_blocks": {
        "attn.norm_q": "img_attn.norm.query_norm",
        "attn.norm_k": "img_attn.norm.key_norm",
        "attn.norm_added_q": "txt_attn.norm.query_norm",
        "attn.norm_added_k": "txt_attn.norm.key_norm",
    },
    "single_transformer_blocks": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"},
}
"""A BFL block's RMSNorm scales (``.scale``) under diffusers' names (``.weight``), the same in FLUX.1 and FLUX.2."""
BLOCK_PREFIX = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


def to_original_names(sd: Mapping[str, torch.Tensor], naming: Naming) -> dict[str, torch.Tensor]:
    """``sd`` (a diffusers transformer state dict) in the original names of ``naming``'s model.

    Raises:
        ValueError: a tensor with no original name (named), or a fused target that misses a part.
    """
    if NAMINGS[naming].same:
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str, int], dict[int, torch.Tensor]] = {}
    for key, t in sd.items():
        module, param = key.rsplit(".", 1)
        m = BLOCK_PATH.match(module)
        if m and m.group(3) in BFL_NORMS[m.group(1)] and param == "weight":
            out[f"{BLOCK_PREFIX[m.group(1)]}.{m.group(2)}.{BFL_NORMS[m.group(1)][m.group(3)]}.scale"] = t
            continue
        target, part, parts = comfy_target(module, naming)
        fused.setdefault((target, param, parts), {})[part] = t
    for (target, param, parts), members in fused.items():
        if sorted(members) != list(range(parts)):
            raise ValueError(f"{target}.{param} fuses {parts} parts; the state dict holds {sorted(members)}")
        t = torch.cat([members[p] for p in range(parts)]) if parts > 1 else members[0]
        if target in NAMINGS[naming].swapped:
            first, second = t.chunk(2, dim=0)
            t = torch.cat([second, first])
        out[f"{target}.{param}"] = t.contiguous()
    return out
