"""The LoRA toolbox's verbs that need the model's names and widths: ``inspect``'s loader report, ``convert`` and
``merge`` (:mod:`qflux.lora.__main__`); the model may sit on the meta device. Files are read and written as
:mod:`qflux.lora.toolbox` does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qflux.config.errors import QfluxError
from qflux.lora.comfyui_keys import delta, key_map
from qflux.lora.formats import NAMINGS, Naming, layer_names, module_out_features, split_lora, to_comfyui
from qflux.lora.kinds import lycoris_modules, lycoris_stem, read_adapter_file
from qflux.lora.original_names import to_original_names
from qflux.lora.toolbox import (
    SPELLINGS,
    TOOL_KEY,
    LoraFile,
    Spelling,
    module_name,
    output_path,
    read_lora_file,
    read_weights,
    write_lora_file,
)
from qflux.lora.tools import Pair


def loader_lines(path: str | Path, transformer: Any, naming: Naming) -> list[str]:
    """What each loader makes of the file on ``transformer`` (names and widths only: it may sit on the meta device):
    the key stems qflux's reader places, those ComfyUI's ``LoraLoaderModelOnly`` applies
    (:func:`qflux.lora.comfyui_keys.key_map`, read at ComfyUI's source) and those diffusers' ``load_lora_weights``
    applies (its own names; ComfyUI and kohya names go through its converter, which is not run here); each with the
    stems it drops."""
    lora = read_lora_file(path)
    sd = lora.tensors()
    _, unknown = split_lora(sd, None, layer_names(transformer, naming), module_out_features(transformer),
                            NAMINGS[naming].swapped)  # fmt: skip
    stems = list(lora.layers)
    comfy = key_map(transformer, naming)
    linear = {p for p, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}

    def line(loader: str, dropped: Sequence[str]) -> str:
        named = f": {', '.join(dropped[:3])}{', …' if len(dropped) > 3 else ''}" if dropped else ""
        return f"{loader:<31}applies {len(stems) - len(dropped)} of {len(stems)} layers, drops {len(dropped)}{named}"

    out = [line("qflux (predict --lora)", [s for s in stems if _strip(s) in unknown]),
           line("ComfyUI (LoraLoaderModelOnly)", [s for s in stems if s not in comfy])]  # fmt: skip
    if lora.spelling == "diffusers":
        out.append(line("diffusers (load_lora_weights)", [s for s in stems if module_name(s) not in linear]))
    else:
        out.append(f"{'diffusers (load_lora_weights)':<31}converts {lora.spelling} names with its own converter "
                   "(not run here)")  # fmt: skip
    return out


def _strip(stem: str) -> str:
    """A key stem as qflux's reader names its module (prefix dropped; kohya's underscores kept)."""
    return next((stem.removeprefix(p) for p in ("transformer.", "diffusion_model.") if stem.startswith(p)),
                stem.removeprefix("lora_unet_"))  # fmt: skip


def convert_file(path: str | Path, to: Literal["diffusers", "comfyui"], transformer: Any, naming: Naming,
                 out: str | Path) -> Path:  # fmt: skip
    """``path`` (any spelling) in diffusers names (``transformer.<module>.lora_A/B.weight``, scale 1: diffusers
    gives each layer α = r) or ComfyUI's native ones (:func:`qflux.lora.formats.to_comfyui`: fused layers, ``.alpha``),
    for ``transformer`` (any device: only its module names and widths are read).

    Raises:
        QfluxError: not a LoRA, or one that adapts modules the model lacks (another model), or ``to`` unknown.
    """
    if to not in ("diffusers", "comfyui"):
        raise QfluxError(f"--to takes diffusers or comfyui; got {to!r}")
    kind, _, stored = read_adapter_file(path, "the LoRA file")
    if kind in ("lokr", "loha"):
        return _convert_lycoris(path, stored, to, transformer, naming, out)
    if kind == "dora" and to == "comfyui":
        raise QfluxError(f"'{path}' is a DoRA: it has no ComfyUI file (ComfyUI divides by ‖W‖ where DoRA divides by "
                         "‖W+ΔW‖, so its image would differ)")  # fmt: skip
    if kind == "dora":
        raise QfluxError(f"'{path}' is a DoRA, which qflux writes in diffusers names only: nothing to convert")
    deltas = _model_deltas(path, transformer, naming)
    widths = module_out_features(transformer)
    diffusers = {}
    for module, (a, b) in deltas.items():
        diffusers[f"transformer.{module}.lora_A.weight"], diffusers[f"transformer.{module}.lora_B.weight"] = a, b
    made = {"verb": "convert", "input": Path(path).name, "to": to}
    if to == "diffusers":
        return write_lora_file(LoraFile(_layers(diffusers, "diffusers"), "diffusers", {}), out, [path], made)
    comfy = to_comfyui(diffusers, scale=1.0, out_features=widths, naming=naming)
    return write_lora_file(LoraFile(_layers(comfy, "comfyui"), "comfyui", {}), out, [path], made)


def _convert_lycoris(path: str | Path, stored: Mapping[str, torch.Tensor], to: str, transformer: Any, naming: Naming,
                     out: str | Path) -> Path:  # fmt: skip
    """A LoKr / LoHa file (qflux's LyCORIS tensors) under the other file's names: ``transformer.<module>`` (diffusers)
    or :func:`qflux.lora.kinds.lycoris_stem`'s (ComfyUI); the tensors and the metadata as they are."""
    linear = [p.removesuffix(".base_layer") for p, m in transformer.named_modules()
              if isinstance(m, torch.nn.Linear) and ".lora_" not in p]  # fmt: skip
    modules = lycoris_modules(linear, naming)
    renamed = {}
    for key, t in stored.items():
        stem, leaf = key.rsplit(".", 1)
        module = modules.get(stem)
        if module is None:
            raise QfluxError(f"'{path}' adapts '{stem}', which the model does not have: it was trained for another "
                             "model; give --model= the model it was trained on")  # fmt: skip
        renamed[f"{f'transformer.{module}' if to == 'diffusers' else lycoris_stem(module, naming)}.{leaf}"] = t
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
    made = {"verb": "convert", "input": Path(path).name, "to": to}
    target = output_path(out, [path])
    save_file(renamed, str(target), metadata={**metadata, TOOL_KEY: json.dumps(made)})
    return target


def merge_file(path: str | Path, model: str | Path, transformer: Any, naming: Naming, out: str | Path,
               dtype: torch.dtype = torch.bfloat16, original: bool = False) -> tuple[Path, int]:  # fmt: skip
    """The transformer of ``model`` (a diffusers folder, or its transformer folder) with the adapter (any kind qflux
    writes: :func:`_merged_weights`) baked in, computed in float32, as one safetensors file in ``dtype`` (float8_e4m3fn:
    :func:`fp8_scaled`): diffusers names,
    or with ``original`` the model's original (BFL) ones, the layout of BFL's and ComfyUI's checkpoints
    (:func:`qflux.lora.original_names.to_original_names`); ``from_single_file`` loads either with the folder's config.
    Returns the file and the number of layers changed.

    Args:
        transformer: ``model``'s transformer, any device (its names and widths map the file's layers).

    Raises:
        QfluxError: an adapter of another model, or a folder without the transformer's weights.
    """
    folder = Path(model)
    folder = folder / "transformer" if (folder / "transformer").is_dir() else folder
    weights = read_weights(folder)
    merged, changed = dict(weights), _merged_weights(path, transformer, naming, weights)
    for module, new in changed.items():
        merged[f"{module}.weight"] = new
    if original:
        merged = to_original_names(merged, naming)
    target = output_path(out, [path, *sorted(folder.glob("*.safetensors"))])
    made = {"verb": "merge", "lora": Path(path).name, "model": str(model), "dtype": str(dtype).removeprefix("torch."),
            "names": "original" if original else "diffusers"}  # fmt: skip
    if dtype == torch.float8_e4m3fn:
        stored = fp8_scaled(merged)
    else:
        stored = {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in merged.items()}
    save_file(stored, str(target), metadata={"format": "pt", TOOL_KEY: json.dumps(made)})
    return target, len(changed)


def _merged_weights(path: str | Path, transformer: Any, naming: Naming, weights: Mapping[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:  # fmt: skip
    """{diffusers module: its weight with the adapter baked in, float32} for a file of any kind qflux writes:
    LoRA W + B·A; LoKr and LoHa W + ΔW as ComfyUI's weight adapters compute it (the same as peft's:
    tests/qflux/test_comfyui_names.py); DoRA m ⊙ V / ‖V‖ with V = W + (α/r)·B·A (norms over each output row).

    Raises:
        QfluxError: a file of another model.
    """
    kind, meta, stored = read_adapter_file(path, "the LoRA file")
    if kind == "lora":
        updates = {m: b.float() @ a.float() for m, (a, b) in _model_deltas(path, transformer, naming).items()}
    elif kind == "dora":
        scale = float(meta["lora_alpha"]) / float(meta["r"])
        updates = {}
        for key in [k for k in stored if k.endswith(".lora_magnitude_vector")]:
            stem = key.removesuffix(".lora_magnitude_vector")
            module = stem.removeprefix("transformer.")
            w = _weight(weights, module, path)
            v = w + scale * stored[f"{stem}.lora_B.weight"].float() @ stored[f"{stem}.lora_A.weight"].float()
            updates[module] = stored[key].float()[:, None] * v / v.norm(dim=1, keepdim=True) - w  # m ⊙ V/‖V‖ − W
    else:
        linear = [p for p, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
        modules = lycoris_modules(linear, naming)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in stored.items():
            stem, leaf = key.rsplit(".", 1)
            if stem not in modules:
                raise QfluxError(f"'{path}' adapts '{stem}', which the model does not have: it was trained for another "
                                 "model; give --into the model it was trained on")  # fmt: skip
            parts.setdefault(modules[stem], {})[leaf] = t
        updates = {m: delta(p) for m, p in parts.items()}
    return {m: _weight(weights, m, path) + d for m, d in updates.items()}


def _weight(weights: Mapping[str, torch.Tensor], module: str, path: str | Path) -> torch.Tensor:
    """A module's weight, float32.

    Raises:
        QfluxError: the model has no such weight (the file adapts another model).
    """
    if f"{module}.weight" not in weights:
        raise QfluxError(f"the model has no weight {module}.weight: '{path}' adapts another model")
    return weights[f"{module}.weight"].float()


FP8_MAX = 448.0
"""The largest float8_e4m3fn value."""


def fp8_scaled(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8-scaled layout: every 2-D ``.weight`` (a linear layer's) as float8_e4m3fn with one float32
    ``<layer>.scale_weight`` (w ≈ scale·w₈, scale = max|w| / 448), the ``scaled_fp8`` marker ComfyUI looks for, and
    every other tensor in bfloat16 (qflux reads such a file kept in fp8: ``model.transformer_file``)."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.float().abs().max().clamp_min(1e-12) / FP8_MAX
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn).contiguous()
            out[k.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            out[k] = v.to(torch.bfloat16).contiguous() if v.is_floating_point() else v.contiguous()
    return out


def _model_deltas(path: str | Path, transformer: Any, naming: Naming) -> dict[str, Pair]:
    """{diffusers module: (A, B)} of a LoRA file of any spelling on ``transformer`` (fused layers split).

    Raises:
        QfluxError: the file adapts modules the model lacks, or does not fit its widths.
    """
    lora = read_lora_file(path)
    sd = lora.tensors()
    widths = module_out_features(transformer)
    try:
        deltas, unknown = split_lora(sd, None, layer_names(transformer, naming), widths, NAMINGS[naming].swapped)
    except ValueError as e:
        raise QfluxError(f"'{path}' does not fit the model: {e}") from None
    if unknown:
        raise QfluxError(f"'{path}' adapts {len(unknown)} module(s) the model does not have (first: {unknown[0]}): "
                         "it was trained for another model; give --model= the model it was trained on")  # fmt: skip
    return deltas


def _layers(sd: Mapping[str, torch.Tensor], spelling: Spelling) -> dict[str, Pair]:
    """{stem: (A, B)} of a state dict in ``spelling`` whose scale is 1."""
    down, up = SPELLINGS[spelling]
    return {k.removesuffix(down): (v, sd[k.removesuffix(down) + up]) for k, v in sd.items() if k.endswith(down)}
