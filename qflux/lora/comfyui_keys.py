"""ComfyUI's LoRA key map for a model, from the names read at ComfyUI's source (``comfyui_lora_keys.json`` beside this
module: ComfyUI is not on PyPI), and the weight update its loaders apply: what ``LoraLoaderModelOnly`` would patch
from a LoRA file (``python -m qflux.lora inspect`` reports it; the tests check every file qflux writes against it).

``family`` below is ComfyUI's model kind: "flux" (FLUX.1), "flux2" (FLUX.2) or "qwen" (Qwen-Image)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

DATA = json.loads((Path(__file__).parent / "comfyui_lora_keys.json").read_text(encoding="utf-8"))
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


@attrs.frozen
class Patch:
    """Where ComfyUI applies a key's update: a ComfyUI weight, the rows of a fused part, a swap of halves."""

    module: str
    rows: tuple[int, int] | None = None
    swap: bool = False


def comfy_modules(transformer: Any, family: str) -> list[str]:
    """The linear layers of ComfyUI's model of ``family`` at the depth and settings of ``transformer``."""
    linear = [p for p, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in p]
    if family == "qwen":
        return [p.removesuffix(".base_layer") for p in linear]
    names = DATA["modules"][family]
    double = len(transformer.transformer_blocks)
    single = len(getattr(transformer, "single_transformer_blocks", []))
    out = [f"double_blocks.{i}.{m}" for i in range(double) for m in names["double"]]
    out += [f"single_blocks.{i}.{m}" for i in range(single) for m in names["single"]]
    out += names["top"] + (names["guidance"] if transformer.config.get("guidance_embeds") else [])
    return out


def key_map(transformer: Any, family: str) -> dict[str, Patch]:
    """{LoRA key stem: Patch} as ComfyUI's ``model_lora_keys_unet`` builds it for this model."""
    modules = comfy_modules(transformer, family)
    out: dict[str, Patch] = {}
    for m in modules:
        for t in DATA["key_map"]["generic"] + (DATA["key_map"]["QwenImage"] if family == "qwen" else []):
            out[t.format(m=m, m_=m.replace(".", "_"))] = Patch(m)
    if family == "qwen":
        return out
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    have = set(modules)
    for d, patch in _flux_to_diffusers(transformer, hidden).items():
        if patch.module in have:
            for t in DATA["key_map"]["Flux"]:
                out[t.format(d=d, d_=d.replace(".", "_"))] = patch
    return out


def _flux_to_diffusers(transformer: Any, hidden: int) -> dict[str, Patch]:
    table = DATA["flux_to_diffusers"]
    out: dict[str, Patch] = {}
    for kind, prefix, bfl in (("double", "transformer_blocks", "double_blocks"),
                              ("single", "single_transformer_blocks", "single_blocks")):  # fmt: skip
        for i in range(len(getattr(transformer, prefix, []))):
            for d, row in table[kind].items():
                rows = (row[1] * hidden, row[2] * hidden) if len(row) == 3 else None
                out[f"{prefix}.{i}.{d}"] = Patch(f"{bfl}.{i}.{row[0]}", rows)
    for d, row in table["basic"].items():
        out[d] = Patch(row[0], None, len(row) > 1)
    return out


def split_key(key: str) -> tuple[str, str]:
    """(stem, tensor name) of a LoRA file key, by the tensor names ComfyUI's loaders read."""
    names = DATA["tensor_names"]
    leaves = [n for pair in names["lora"] for n in pair] + names["common"] + names["loha"] + names["lokr"]
    for leaf in sorted(leaves, key=len, reverse=True):
        if key.endswith("." + leaf):
            return key[: -len(leaf) - 1], leaf
    raise ValueError(f"'{key}' holds a tensor ComfyUI's loaders do not read")


def stems(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{stem: {tensor name: tensor}} of a LoRA state dict."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        stem, leaf = split_key(key)
        out.setdefault(stem, {})[leaf] = t
    return out


def delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """ΔW [out, in] as ComfyUI's weight adapters compute it at strength 1 (comfy/weight_adapter/lora.py,
    lokr.py, loha.py): alpha / rank with the rank of a low-rank factor, else 1."""
    alpha = parts.get("alpha")
    if "hada_w1_a" in parts:
        scale = float(alpha) / parts["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return scale * (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
    if any(k.startswith("lokr_") for k in parts):
        dim, w1, w2 = None, parts.get("lokr_w1"), parts.get("lokr_w2")
        if w1 is None:
            dim, w1 = parts["lokr_w1_b"].shape[0], parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        if w2 is None:
            dim, w2 = parts["lokr_w2_b"].shape[0], parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
        return scale * torch.kron(w1, w2)
    up = parts.get("lora_up.weight", parts.get("lora_B.weight"))
    down = parts.get("lora_down.weight", parts.get("lora_A.weight"))
    if up is None or down is None:
        raise ValueError(f"a LoRA layer without its up and down tensors: {sorted(parts)}")
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    return scale * up.float() @ down.float()


def patched(sd: Mapping[str, torch.Tensor], kmap: Mapping[str, Patch], widths: Mapping[str, tuple[int, int]]
            ) -> tuple[dict[str, torch.Tensor], list[str]]:  # fmt: skip
    """({ComfyUI weight: the ΔW ComfyUI adds to it}, stems it leaves unloaded) for a LoRA state dict."""
    out: dict[str, torch.Tensor] = {}
    lost = []
    for stem, parts in stems(sd).items():
        patch = kmap.get(stem)
        if patch is None:
            lost.append(stem)
            continue
        d = delta({k: v.float() for k, v in parts.items()})
        if patch.swap:  # comfy.utils.swap_scale_shift on the update
            first, second = d.chunk(2, dim=0)
            d = torch.cat([second, first])
        w = out.setdefault(patch.module, torch.zeros(widths[patch.module]))
        if patch.rows is None:
            w += d
        else:
            w[patch.rows[0] : patch.rows[0] + patch.rows[1]] += d
    return out, lost
