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
names under ``diffusion_model.`` (``ComfyNames(same=True)``), nothing fused. Each family's name table is in
its folder (``qflux/models/<family>/names.py``), registered by name (:func:`register_naming`).

Reading (:func:`split_lora`) is the inverse for any of these spellings, at any model width: each
file module becomes its diffusers modules' (A, B) with the file's scale folded into B.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from qflux.config.errors import QfluxError

Params = dict[str, torch.Tensor]
Delta = tuple[torch.Tensor, torch.Tensor]
"""(A [r, in], B [out, r]) of one module with the file's scale folded into B: ΔW = B·A."""
Target = tuple[str, int, int]
"""(ComfyUI module, part, parts) of a diffusers module."""

BLOCK_PATH = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


@attrs.frozen
class ComfyNames:
    """How one model's ComfyUI file names its diffusers modules (each family's ``names.py`` makes one).

    BFL's names for FLUX models: a diffusers module in a double or single block, or at the top, maps to
    (BFL module, part, parts), several parts where BFL fuses layers. ``same``: ComfyUI names the modules
    as diffusers does (Qwen-Image)."""

    double: Mapping[str, Target] = attrs.field(factory=dict)
    """Diffusers module inside a double block → (BFL module, part index, number of parts)."""
    single: Mapping[str, Target] = attrs.field(factory=dict)
    """The same inside a single block."""
    top: Mapping[str, str] = attrs.field(factory=dict)
    """Top-level diffusers module → BFL module."""
    swapped: frozenset[str] = frozenset()
    """BFL modules whose output halves are in the other order than diffusers' (shift, scale)."""
    known_top: frozenset[str] | None = None
    """The top-level diffusers names ComfyUI's key map knows for this model (``comfy/utils.py``
    ``flux_to_diffusers``); None: every one. A file keyed by another loses that module there."""
    same: bool = False
    label: str = "this model"
    """How messages name the model."""


def fused(module: str, *parts: str) -> dict[str, Target]:
    """Diffusers modules that BFL fuses into ``module``, in its order: each → (``module``, its index, how many)."""
    return {part: (module, i, len(parts)) for i, part in enumerate(parts)}


def renamed(names: Mapping[str, str]) -> dict[str, Target]:
    """Diffusers modules that BFL keeps whole under another name: each → (its BFL name, 0, 1)."""
    return {module: (name, 0, 1) for module, name in names.items()}


BFL_ATTENTION: dict[str, Target] = {
    **fused("img_attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
    **fused("txt_attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    **renamed({"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}),
}
"""A BFL double block's attention: diffusers' separate q/k/v fused into ``img_attn.qkv`` / ``txt_attn.qkv``, and the
two output projections (the same in every BFL model)."""
BFL_ENDS = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
"""A BFL model's input and output layers (the same in every BFL model)."""
BFL_SWAPPED = frozenset({"final_layer.adaLN_modulation.1"})
"""BFL's final modulation holds (shift, scale) where diffusers holds (scale, shift)."""


NAMINGS: dict[str, ComfyNames] = {}
"""Each naming (a family's ``NAMING``) → its names; the families add theirs when imported."""


def register_naming(name: str, names: ComfyNames) -> None:
    """Make ``name`` a naming the ComfyUI files and readers use."""
    NAMINGS[name] = names


def comfy_target(module: str, naming: Naming) -> Target:
    """(ComfyUI module, part, parts) of a diffusers module path under ``naming``.

    Raises:
        ValueError: a module with no ComfyUI name, named.
    """
    names = NAMINGS[naming]
    if names.same:
        return module, 0, 1
    double, single, top = names.double, names.single, names.top
    m = BLOCK_PATH.match(module)
    if m:
        kind, i, rest = m.groups()
        table, prefix = (double, "double_blocks") if kind == "transformer_blocks" else (single, "single_blocks")
        if rest in table:
            name, part, parts = table[rest]
            return f"{prefix}.{i}.{name}", part, parts
    elif module in top:
        return top[module], 0, 1
    raise ValueError(f"no ComfyUI (BFL) name for the {names.label} module '{module}'")


def _split_modules(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A [r, in], B [out, r])} from diffusers keys ``transformer.<m>.lora_A.weight``."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in sd.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            out[module] = (a, sd[key.replace(".lora_A.", ".lora_B.")])
    return out


Naming = str
"""The name of a registered :class:`ComfyNames` (``flux``, ``qwen``, ``flux2``: a family's ``NAMING``)."""


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """[a; b] → [b; a] along dim 0 (diffusers' scale/shift ↔ BFL's shift/scale; its own inverse)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def unconvertible(modules: list[str], naming: Naming) -> list[str]:
    """The diffusers module paths among ``modules`` that have no ComfyUI name under ``naming``."""
    out = []
    for m in modules:
        try:
            comfy_target(m, naming)
        except ValueError:
            out.append(m)
    return out


def check_convertible(modules: list[str], naming: Naming) -> None:
    """Refuse, before training, adapted modules that the ComfyUI file could not hold.

    Raises:
        QfluxError: naming the first such module and the module names that convert.
    """

    bad = unconvertible(modules, naming)
    if bad:
        names = NAMINGS[naming]
        kinds = ["every linear layer"] if names.same else sorted({*names.double, *names.single, *names.top})
        raise QfluxError(
            f"model.lora.target_modules adapts {len(bad)} module(s) with no ComfyUI name (first: {bad[0]}); the "
            f"ComfyUI file holds {', '.join(kinds)}. Remove those targets, or set train.lora_format: diffusers"
        )


def to_comfyui(
    sd: Mapping[str, torch.Tensor], *, scale: float, out_features: Callable[[str], int], naming: Naming
) -> Params:
    """Convert our diffusers-format LoRA to ComfyUI's native naming (see the module docstring).

    Args:
        sd: ``transformer.<module>.lora_{A,B}.weight`` tensors.
        scale: α/r of the adapter (ΔW = scale·B·A).
        out_features: output width of a diffusers module path (to size zero blocks of fused layers).
        naming: the model's ComfyUI names (:data:`NAMINGS`).

    Returns:
        ``diffusion_model.<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` tensors.
    """
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    parts_of: dict[str, list[str]] = {}
    for module, ab in _split_modules(sd).items():
        target, part, parts = comfy_target(module, naming)
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
                members[p][1].shape[0] if p in members else out_features(_part_module(names, target, p, naming))
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
        if target in NAMINGS[naming].swapped:
            up = _swap_halves(up)
        rank = down.shape[0]
        key = f"diffusion_model.{target}"
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(scale * rank, dtype=down.dtype)
    return out


def _part_module(names: list[str], target: str, part: int, naming: Naming) -> str:
    """The diffusers module path of part ``part`` of a fused BFL layer (for its width)."""
    if names[part]:
        return names[part]
    prefix = "transformer_blocks" if target.startswith("double_blocks") else "single_transformer_blocks"
    index = target.split(".")[1]
    table = NAMINGS[naming].double if prefix == "transformer_blocks" else NAMINGS[naming].single
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
            target, part, parts = comfy_target(module, naming)
        except ValueError:
            continue
        if target != module:
            names.setdefault(target, []).append((module, part, parts))
    return names


def peft_scale(metadata: Mapping[str, str] | None) -> Callable[[str, int], float]:
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
    swapped: frozenset[str] = frozenset(),
) -> tuple[dict[str, Delta], list[str]]:
    """Read a LoRA state dict of any spelling (diffusers / peft ``lora_A``·``lora_B``, ComfyUI or kohya
    ``lora_down``·``lora_up``·``alpha``) into each diffusers module's update, the inverse of
    :func:`to_comfyui`.

    A fused file module is split into its parts' row blocks; a part keeps only the columns of ``up``
    that are non-zero in its rows (our block-diagonal export: its own rank), and a part whose rows are
    all zero has no update. The scale is the file's: ``.alpha``/rank, else the peft config in the
    metadata (:func:`peft_scale`), else 1.

    Args:
        names: :func:`layer_names` of the model.
        out_features: width of a diffusers module (:func:`module_out_features`).
        swapped: the naming's modules whose output halves ComfyUI orders otherwise (:class:`ComfyNames`).

    Returns:
        ({diffusers module: (A [r, in], B [out, r]) float32 with ΔW = B·A}, file modules the model lacks).

    Raises:
        ValueError: a fused module whose ``up`` does not have the parts' total width.
    """
    kohya = {n.replace(".", "_"): n for n in names}
    scale_of = peft_scale(metadata)
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
        scale = float(alpha) / rank if alpha is not None else scale_of(name, rank)
        if name in swapped:
            up = _swap_halves(up)
        deltas |= _parts(name, down, up.float() * scale, targets, out_features)
    return deltas, unknown
