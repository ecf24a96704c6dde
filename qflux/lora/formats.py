"""LoRA files in other trainers' formats: ComfyUI's native naming, kohya's, and back.

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
a LoRA); α' = r'·(α/r) keeps the scale, so ΔW of every part is unchanged. The final modulation
``norm_out.linear`` is BFL's ``final_layer.adaLN_modulation.1`` with its two output halves in the
other order ([shift; scale] against diffusers' [scale; shift]), so ``up``'s halves are swapped.
Kohya files are the same tensors keyed ``lora_unet_<path with dots as underscores>``.

ComfyUI's Qwen-Image model uses diffusers' own module names, so a Qwen-Image-Edit LoRA keeps its
names under ``diffusion_model.`` (:func:`same_module`), nothing fused.

Reading (:func:`split_lora`) is the inverse for any of these spellings, at any model width: each
file module becomes its diffusers modules' (A, B) with the file's scale folded into B.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch

Params = dict[str, torch.Tensor]
Delta = tuple[torch.Tensor, torch.Tensor]
"""(A [r, in], B [out, r]) of one module with the file's scale folded into B: ΔW = B·A."""
Target = tuple[str, int, int]
"""(ComfyUI module, part, parts) of a diffusers module."""

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
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SWAPPED = frozenset({"final_layer.adaLN_modulation.1"})
"""BFL modules whose output halves are in the other order than diffusers' (shift, scale)."""
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


Tables = tuple[dict[str, Target], dict[str, Target], dict[str, str]]
"""A model's BFL names: (double-block modules, single-block modules, top-level modules)."""


def _bfl_name(module: str, tables: Tables, model: str) -> tuple[str, int, int]:
    """(BFL module, part, parts) of a diffusers module path by ``tables``, or raise naming the module."""
    double, single, top = tables
    m = _BLOCK.match(module)
    if m:
        kind, i, rest = m.groups()
        table, prefix = (double, "double_blocks") if kind == "transformer_blocks" else (single, "single_blocks")
        if rest in table:
            name, part, parts = table[rest]
            return f"{prefix}.{i}.{name}", part, parts
    elif module in top:
        return top[module], 0, 1
    raise ValueError(f"no ComfyUI (BFL) name for the {model} module '{module}'")


def bfl_target(module: str) -> tuple[str, int, int]:
    """(BFL module, part, parts) of a diffusers FLUX.1 module path, or raise naming the module."""
    return _bfl_name(module, BFL_TABLES["flux"], "Flux")


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


# FLUX.2: BFL's names, which are ComfyUI's own module names for the model (comfy/ldm/flux/model.py with
# ``global_modulation``: double_blocks / single_blocks / final_layer, img_in, txt_in, time_in and the
# shared double_stream_modulation_img / _txt and single_stream_modulation, each a Modulation with
# ``.lin``), so ComfyUI's generic ``diffusion_model.<name>`` LoRA keys reach them; diffusers' own FLUX.2
# converter (``_convert_non_diffusers_flux2_lora_to_diffusers``) maps the same pairs back. The double
# blocks' q/k/v fuse as in FLUX.1; a single block's q/k/v/MLP projection is already fused in diffusers.
_DOUBLE2 = {
    **{k: v for k, v in _DOUBLE.items() if "qkv" in v[0] or k in ("attn.to_out.0", "attn.to_add_out")},
    "ff.linear_in": ("img_mlp.0", 0, 1),
    "ff.linear_out": ("img_mlp.2", 0, 1),
    "ff_context.linear_in": ("txt_mlp.0", 0, 1),
    "ff_context.linear_out": ("txt_mlp.2", 0, 1),
}
_SINGLE2 = {"attn.to_qkv_mlp_proj": ("linear1", 0, 1), "attn.to_out": ("linear2", 0, 1)}
_TOP2 = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}


def bfl2_target(module: str) -> tuple[str, int, int]:
    """(BFL module, part, parts) of a diffusers FLUX.2 module path, or raise naming the module."""
    return _bfl_name(module, BFL_TABLES["flux2"], "FLUX.2")


BFL_TABLES: dict[str, Tables] = {"flux": (_DOUBLE, _SINGLE, _TOP), "flux2": (_DOUBLE2, _SINGLE2, _TOP2)}
"""The BFL name tables of each naming that has them."""

Naming = Literal["flux", "qwen", "flux2"]
NAMINGS: dict[str, Callable[[str], Target]] = {"flux": bfl_target, "qwen": same_module, "flux2": bfl2_target}
"""How each model's ComfyUI file names a diffusers module."""


def lycoris_stem(module: str, naming: Naming) -> str:
    """The ComfyUI file's name of a diffusers module's LyCORIS tensors (LoKr, LoHa).

    A module that is a whole ComfyUI layer goes under that layer's own name, ``diffusion_model.<name>``,
    which ComfyUI's ``model_lora_keys_unet`` maps for every model (its generic key). A part of a fused
    layer (FLUX double-block q/k/v, FLUX.1's ``linear1``), or a layer whose output halves ComfyUI swaps
    (``final_layer.adaLN_modulation.1``), goes under SimpleTuner's ``lycoris_<path with _>``, which its
    Flux key map (``comfy/utils.py`` ``flux_to_diffusers``) places with the part's row offset (and the
    swap): a Kronecker or Hadamard product cannot be stacked into a fused layer as LoRA factors can.

    Raises:
        ValueError: a module with no ComfyUI name under ``naming``.
    """
    target, _, parts = NAMINGS[naming](module)
    if parts == 1 and target not in SWAPPED:
        return f"diffusion_model.{target}"
    return f"lycoris_{module.replace('.', '_')}"


def lycoris_modules(modules: Iterable[str], naming: Naming) -> dict[str, str]:
    """Every name a LyCORIS file may give one of ``modules`` → that module: ``transformer.<path>``,
    ``lycoris_<path with _>`` and the ComfyUI name :func:`lycoris_stem` writes (the inverse of both files)."""
    out: dict[str, str] = {}
    for m in modules:
        out[f"transformer.{m}"] = m
        out[f"lycoris_{m.replace('.', '_')}"] = m
        with contextlib.suppress(ValueError):  # no ComfyUI name: only the other two spellings
            out[lycoris_stem(m, naming)] = m
    return out


COMFY_DIFFUSERS_TOP: dict[str, frozenset[str]] = {"flux": frozenset(_TOP), "flux2": frozenset(_TOP) & frozenset(_TOP2)}
"""The top-level diffusers module names ComfyUI's Flux key map knows (``comfy/utils.py`` ``flux_to_diffusers``:
FLUX.1's, which FLUX.2 shares only for x_embedder, context_embedder, proj_out and norm_out.linear); its block
maps hold both models' block names. Qwen-Image's key map knows every diffusers name."""


def comfy_drops(modules: Iterable[str], naming: Naming) -> list[str]:
    """The adapted modules that ComfyUI would not load from a file keyed by diffusers names
    (``transformer.<module>``: the diffusers file and a LyCORIS ``transformer.`` file); they load from
    the ComfyUI file (:func:`lycoris_stem`, :func:`flux_to_comfyui`)."""
    if naming not in COMFY_DIFFUSERS_TOP:
        return []
    known = COMFY_DIFFUSERS_TOP[naming]
    return [m for m in modules if _BLOCK.match(m) is None and m not in known]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """[a; b] → [b; a] along dim 0 (diffusers' scale/shift ↔ BFL's shift/scale; its own inverse)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def unconvertible(modules: list[str], naming: Naming) -> list[str]:
    """The diffusers module paths among ``modules`` that have no ComfyUI name under ``naming``."""
    out = []
    for m in modules:
        try:
            NAMINGS[naming](m)
        except ValueError:
            out.append(m)
    return out


def check_convertible(modules: list[str], naming: Naming) -> None:
    """Refuse, before training, adapted modules that the ComfyUI file could not hold.

    Raises:
        QfluxError: naming the first such module and the module names that convert.
    """
    from qflux.errors import QfluxError

    bad = unconvertible(modules, naming)
    if bad:
        tables = BFL_TABLES.get(naming)
        kinds = sorted({k for t in tables for k in t}) if tables else ["every linear layer"]
        raise QfluxError(
            f"model.lora.target_modules adapts {len(bad)} module(s) with no ComfyUI name (first: {bad[0]}); the "
            f"ComfyUI file holds {', '.join(kinds)}. Remove those targets, or set train.lora_format: diffusers"
        )


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
        if target in SWAPPED:
            up = _swap_halves(up)
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


_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"))
_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")
_KOHYA = "lora_unet_"


def layer_names(transformer: Any, naming: Naming) -> dict[str, list[Target]]:
    """Every name a LoRA file may give a linear layer of ``transformer`` → the diffusers modules it
    covers, as (module, part, parts): diffusers' own paths, and the ComfyUI names of ``naming``
    (a fused BFL layer lists all its parts). Built from the model, so it holds at any width and depth."""
    names: dict[str, list[Target]] = {}
    for path, m in transformer.named_modules():
        if not isinstance(m, torch.nn.Linear) or ".lora_" in path:
            continue
        module = path.removesuffix(".base_layer")
        names[module] = [(module, 0, 1)]
        try:
            target, part, parts = NAMINGS[naming](module)
        except ValueError:
            continue
        if target != module:
            names.setdefault(target, []).append((module, part, parts))
    return names


def _peft_scale(metadata: Mapping[str, str] | None) -> Callable[[str, int], float]:
    """``scale(module, rank)`` from the peft config diffusers writes in a file's metadata
    (α/r, α/√r with rsLoRA, per-module α from ``alpha_pattern``); 1 without one (peft's α = r)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    cfg = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()} if raw else {}

    def scale(module: str, rank: int) -> float:
        if cfg.get("lora_alpha") is None:
            return 1.0
        alpha = float(cfg["lora_alpha"])
        for pattern, value in (cfg.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                alpha = float(value)
        return alpha / rank**0.5 if cfg.get("use_rslora") else alpha / rank

    return scale


def _parts(
    name: str, down: torch.Tensor, up: torch.Tensor, targets: list[Target], out_features: Callable[[str], int]
) -> dict[str, Delta]:
    """The diffusers modules' updates of one file module (``up`` scaled): itself, or the row blocks
    of a fused one (a part keeps the non-zero columns of its rows; all-zero rows: no update).

    Raises:
        ValueError: a fused module whose ``up`` does not have the parts' total width.
    """
    if len(targets) == 1 and targets[0][2] == 1:
        return {targets[0][0]: (down.float(), up.float())}
    by_part = {part: module for module, part, _ in targets}
    widths = [out_features(by_part[p]) for p in range(targets[0][2])]
    if up.shape[0] != sum(widths):
        parts = "+".join(map(str, widths))
        raise ValueError(f"{name}: lora_up has {up.shape[0]} rows; the model's parts have {parts}")
    out, row = {}, 0
    for part, width in enumerate(widths):
        b, row = up[row : row + width], row + width
        used = (b != 0).any(0)
        if not used.any():
            continue  # ΔW = 0 for this part (e.g. proj_mlp of a fused linear1 without a LoRA of its own)
        a = down if used.all() else down[used]
        out[by_part[part]] = (a.float(), (b if used.all() else b[:, used]).float())
    return out


def split_lora(
    sd: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    names: Mapping[str, list[Target]],
    out_features: Callable[[str], int],
) -> tuple[dict[str, Delta], list[str]]:
    """Read a LoRA state dict of any spelling (diffusers / peft ``lora_A``·``lora_B``, ComfyUI or kohya
    ``lora_down``·``lora_up``·``alpha``) into each diffusers module's update, the inverse of
    :func:`flux_to_comfyui`.

    A fused file module is split into its parts' row blocks; a part keeps only the columns of ``up``
    that are non-zero in its rows (our block-diagonal export: its own rank), and a part whose rows are
    all zero has no update. The scale is the file's: ``.alpha``/rank, else the peft config in the
    metadata (:func:`_peft_scale`), else 1.

    Args:
        names: :func:`layer_names` of the model.
        out_features: width of a diffusers module (:func:`module_out_features`).

    Returns:
        ({diffusers module: (A [r, in], B [out, r]) float32 with ΔW = B·A}, file modules the model lacks).

    Raises:
        ValueError: a fused module whose ``up`` does not have the parts' total width.
    """
    kohya = {n.replace(".", "_"): n for n in names}
    peft_scale = _peft_scale(metadata)
    deltas: dict[str, Delta] = {}
    unknown: list[str] = []
    for key, down in sd.items():
        pair = next(((d, u) for d, u in _PAIRS if key.endswith(d)), None)
        if pair is None:
            continue
        stem = key[: -len(pair[0])]
        up = sd[stem + pair[1]]
        alpha = sd.get(stem + ".alpha")
        name = stem
        if name.startswith(_KOHYA):
            name = kohya.get(name.removeprefix(_KOHYA), name.removeprefix(_KOHYA))
        name = next((name.removeprefix(p) for p in _PREFIXES if name.startswith(p)), name)
        targets = names.get(name)
        if not targets:
            unknown.append(name)
            continue
        rank = down.shape[0]
        scale = float(alpha) / rank if alpha is not None else peft_scale(name, rank)
        if name in SWAPPED:
            up = _swap_halves(up)
        deltas |= _parts(name, down, up.float() * scale, targets, out_features)
    return deltas, unknown
