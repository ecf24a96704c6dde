"""The LoRA toolbox's verbs on files: ``python -m qflux.lora inspect|resize|extract|ema`` (:mod:`qflux.lora.__main__`).

A LoRA file is read in its own spelling and written back in it: diffusers / peft (``<stem>.lora_A.weight``,
``<stem>.lora_B.weight``, the scale α/r in the peft config of the metadata) or ComfyUI / kohya
(``<stem>.lora_down.weight``, ``<stem>.lora_up.weight``, ``<stem>.alpha``). A verb that writes takes the output
path, writes safetensors with metadata saying what made it, and never writes over an input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qflux.config.errors import QfluxError
from qflux.lora.comfyui_keys import key_map
from qflux.lora.formats import NAMINGS, Naming, layer_names, module_out_features, peft_scale, split_lora, to_comfyui
from qflux.lora.kinds import lycoris_modules, lycoris_stem, read_adapter_file
from qflux.lora.original_names import to_original_names
from qflux.lora.tools import Pair, delta_norm, extract, post_hoc_ema, resize

Spelling = Literal["diffusers", "comfyui", "kohya"]
SPELLINGS: dict[Spelling, tuple[str, str]] = {
    "diffusers": (".lora_A.weight", ".lora_B.weight"),
    "comfyui": (".lora_down.weight", ".lora_up.weight"),
    "kohya": (".lora_down.weight", ".lora_up.weight"),
}
"""Each spelling's (down, up) key endings."""
TOOL_KEY = "qflux_tool"
"""The metadata entry that says which verb wrote a file, from what."""


@attrs.frozen
class LoraFile:
    """A LoRA file's layers, each scale folded into B (ΔW = B·A)."""

    layers: dict[str, Pair]
    """{key stem: (A [r, in], B [out, r])} float32, in the file's order."""
    spelling: Spelling
    metadata: dict[str, str]


def read_lora_file(path: str | Path) -> LoraFile:
    """The layers of a LoRA file of any spelling (:class:`LoraFile`).

    Raises:
        QfluxError: a missing or unreadable file, another adapter kind (DoRA, LoKr, LoHa), or no LoRA tensors.
    """
    kind, _, sd = read_adapter_file(path, "the LoRA file")
    if kind != "lora":
        raise QfluxError(f"'{path}' is a {kind} adapter; this verb takes a LoRA (lora_A/lora_B or lora_down/lora_up)")
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
    spelling: Spelling = "diffusers" if any(k.endswith(SPELLINGS["diffusers"][0]) for k in sd) else "comfyui"
    down_end, up_end = SPELLINGS[spelling]
    if spelling == "comfyui" and any(k.startswith("lora_unet_") for k in sd):
        spelling = "kohya"
    scale_of = peft_scale(metadata)
    layers = {}
    for key, down in sd.items():
        if not key.endswith(down_end):
            continue
        stem = key.removesuffix(down_end)
        up, rank = sd.get(stem + up_end), down.shape[0]
        if up is None:
            raise QfluxError(f"'{path}': {key} has no {stem + up_end}")
        alpha = sd.get(stem + ".alpha")
        scale = float(alpha) / rank if alpha is not None else scale_of(_module(stem), rank)
        layers[stem] = (down.float(), up.float() * scale)
    if not layers:
        raise QfluxError(f"'{path}' holds no LoRA tensors (lora_A/lora_B or lora_down/lora_up): it is not a LoRA")
    return LoraFile(layers, spelling, metadata)


def _module(stem: str) -> str:
    """A diffusers stem's module name (``transformer.`` dropped), as the peft config names it."""
    return stem.removeprefix("transformer.")


def write_lora_file(lora: LoraFile, out: str | Path, inputs: Sequence[str | Path], made_by: Mapping[str, Any]) -> Path:
    """Write ``lora`` in its spelling at scale 1 (α = r: every layer's B carries its scale), with ``made_by``
    in the metadata.

    Raises:
        QfluxError: ``out`` is one of ``inputs`` (an input is never written over).
    """
    path = _output(out, inputs)
    down_end, up_end = SPELLINGS[lora.spelling]
    sd: dict[str, torch.Tensor] = {}
    for stem, (a, b) in lora.layers.items():
        sd[stem + down_end], sd[stem + up_end] = a.contiguous(), b.contiguous()
        if lora.spelling != "diffusers":
            sd[stem + ".alpha"] = torch.tensor(float(a.shape[0]))
    metadata = {**lora.metadata, "format": "pt", TOOL_KEY: json.dumps(dict(made_by))}
    if "lora_adapter_metadata" in metadata:  # the peft config: α = r for every layer (scale 1)
        ranks = {_module(s): a.shape[0] for s, (a, _) in lora.layers.items()}
        r = max(ranks.values())
        pattern = {m: k for m, k in ranks.items() if k != r}  # α = r everywhere: a layer of another rank names both
        config = json.loads(metadata["lora_adapter_metadata"])
        config |= {"r": r, "lora_alpha": r, "use_rslora": False, "rank_pattern": pattern, "alpha_pattern": pattern}
        metadata["lora_adapter_metadata"] = json.dumps(config)
    save_file(sd, str(path), metadata=metadata)
    return path


def _output(out: str | Path, inputs: Sequence[str | Path]) -> Path:
    """``out`` as a path, its folder made.

    Raises:
        QfluxError: ``out`` is one of ``inputs`` (an input is never written over) or an existing folder.
    """
    path = Path(out)
    if any(path.resolve() == Path(p).resolve() for p in inputs):
        raise QfluxError(f"--out '{path}' is an input of this command; give another path (inputs are never replaced)")
    if path.is_dir():
        raise QfluxError(f"--out '{path}' is a folder; give the .safetensors file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def inspect_lines(path: str | Path) -> list[str]:
    """What ``inspect`` prints: the spelling, the layers, ranks and targets, and each layer's ‖ΔW‖_F."""
    lora = read_lora_file(path)
    ranks = sorted({a.shape[0] for a, _ in lora.layers.values()})
    targets = sorted({_target(s) for s in lora.layers})
    lines = [
        f"file      {path}",
        f"kind      lora, {lora.spelling} names, {len(lora.layers)} layers, rank {'/'.join(map(str, ranks))}",
        f"targets   {', '.join(targets)}",
        "layer norms ‖ΔW‖_F (scale folded in):",
    ]
    lines += [f"  {stem}  {delta_norm(a, b):.6g}" for stem, (a, b) in lora.layers.items()]
    return lines


def loader_lines(path: str | Path, transformer: Any, naming: Naming) -> list[str]:
    """What each loader makes of the file on ``transformer`` (names and widths only: it may sit on the meta device):
    the key stems qflux's reader places, those ComfyUI's ``LoraLoaderModelOnly`` applies
    (:func:`qflux.lora.comfyui_keys.key_map`, read at ComfyUI's source) and those diffusers' ``load_lora_weights``
    applies (its own names; ComfyUI and kohya names go through its converter, which is not run here); each with the
    stems it drops."""
    lora = read_lora_file(path)
    down, up = SPELLINGS[lora.spelling]
    sd = {k: t for stem, (a, b) in lora.layers.items() for k, t in ((stem + down, a), (stem + up, b))}
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
        out.append(line("diffusers (load_lora_weights)", [s for s in stems if _module(s) not in linear]))
    else:
        out.append(f"{'diffusers (load_lora_weights)':<31}converts {lora.spelling} names with its own converter "
                   "(not run here)")  # fmt: skip
    return out


def _strip(stem: str) -> str:
    """A key stem as qflux's reader names its module (prefix dropped; kohya's underscores kept)."""
    return next((stem.removeprefix(p) for p in ("transformer.", "diffusion_model.") if stem.startswith(p)),
                stem.removeprefix("lora_unet_"))  # fmt: skip


def _target(stem: str) -> str:
    """The module kind a stem adapts: its name without block numbers and prefixes (``attn.to_q``)."""
    name = re.sub(r"^(transformer|diffusion_model|lora_unet)[._]", "", stem)
    return re.sub(r"^(?:[a-z_]*blocks)[._]\d+[._]", "", name)


def resize_file(path: str | Path, rank: int, out: str | Path) -> tuple[Path, dict[str, float]]:
    """``path`` at rank ``rank`` (:func:`qflux.lora.tools.resize`); returns the file and the energy kept per layer."""
    if rank < 1:
        raise QfluxError(f"--rank must be at least 1; got {rank}")
    lora = read_lora_file(path)
    layers, kept = {}, {}
    for stem, (a, b) in lora.layers.items():
        layers[stem], kept[stem] = resize(a, b, rank)
    made = {"verb": "resize", "input": Path(path).name, "rank": rank}
    return write_lora_file(attrs.evolve(lora, layers=layers), out, [path], made), kept


def extract_file(base: str | Path, tuned: str | Path, rank: int, out: str | Path,
                 prefix: str = "transformer.") -> tuple[Path, dict[str, float]]:  # fmt: skip
    """A diffusers-named LoRA of rank ``rank`` from the 2-D weights that differ between two transformer state
    dicts (safetensors files, or diffusers folders of them: :func:`read_weights`); returns the file and the energy
    kept per layer.

    Raises:
        QfluxError: no weight differs, or the two do not share their 2-D weights' names and shapes.
    """
    if rank < 1:
        raise QfluxError(f"--rank must be at least 1; got {rank}")
    a, b = read_weights(base), read_weights(tuned)
    layers, kept = {}, {}
    for name, w in a.items():
        if w.ndim != 2 or not name.endswith(".weight"):
            continue
        if name not in b or b[name].shape != w.shape:
            raise QfluxError(
                f"'{tuned}' has no weight {name} of shape {tuple(w.shape)}: not the same model as '{base}'"
            )
        if torch.equal(w, b[name]):
            continue
        stem = prefix + name.removesuffix(".weight")
        layers[stem], kept[stem] = extract(w, b[name], rank)
    if not layers:
        raise QfluxError(f"no 2-D weight differs between '{base}' and '{tuned}': nothing to extract")
    made = {"verb": "extract", "base": Path(base).name, "tuned": Path(tuned).name, "rank": rank}
    return write_lora_file(LoraFile(layers, "diffusers", {}), out, [base, tuned], made), kept


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from every ``*.safetensors`` of a folder (a diffusers component
    folder, sharded or not)."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise QfluxError(f"'{p}' is neither a .safetensors file nor a folder of them")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            out |= {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return out


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
    target = _output(out, [path])
    save_file(renamed, str(target), metadata={**metadata, TOOL_KEY: json.dumps(made)})
    return target


def merge_file(path: str | Path, model: str | Path, transformer: Any, naming: Naming, out: str | Path,
               dtype: torch.dtype = torch.bfloat16, original: bool = False) -> tuple[Path, int]:  # fmt: skip
    """The transformer of ``model`` (a diffusers folder, or its transformer folder) with the LoRA baked in,
    W ← W + ΔW for each adapted layer (computed in float32), as one safetensors file in ``dtype``: diffusers names,
    or with ``original`` the model's original (BFL) ones, the layout of BFL's and ComfyUI's checkpoints
    (:func:`qflux.lora.original_names.to_original_names`); ``from_single_file`` loads either with the folder's config.
    Returns the file and the number of layers changed.

    Args:
        transformer: ``model``'s transformer, any device (its names and widths map the file's layers).

    Raises:
        QfluxError: not a LoRA, a LoRA of another model, or a folder without the transformer's weights.
    """
    folder = Path(model)
    folder = folder / "transformer" if (folder / "transformer").is_dir() else folder
    weights = read_weights(folder)
    deltas = _model_deltas(path, transformer, naming)
    missing = [m for m in deltas if f"{m}.weight" not in weights]
    if missing:
        raise QfluxError(f"'{folder}' has no weight {missing[0]}.weight: not the model '{path}' adapts")
    merged = dict(weights)
    for module, (a, b) in deltas.items():
        w = weights[f"{module}.weight"]
        merged[f"{module}.weight"] = w.float() + b.float() @ a.float()  # W + B·A
    if original:
        merged = to_original_names(merged, naming)
    target = _output(out, [path, *sorted(folder.glob("*.safetensors"))])
    made = {"verb": "merge", "lora": Path(path).name, "model": str(model), "dtype": str(dtype).removeprefix("torch."),
            "names": "original" if original else "diffusers"}  # fmt: skip
    save_file({k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in merged.items()},
              str(target), metadata={"format": "pt", TOOL_KEY: json.dumps(made)})  # fmt: skip
    return target, len(deltas)


def _model_deltas(path: str | Path, transformer: Any, naming: Naming) -> dict[str, Pair]:
    """{diffusers module: (A, B)} of a LoRA file of any spelling on ``transformer`` (fused layers split).

    Raises:
        QfluxError: the file adapts modules the model lacks, or does not fit its widths.
    """
    lora = read_lora_file(path)
    down, up = SPELLINGS[lora.spelling]
    sd = {k: t for stem, (a, b) in lora.layers.items() for k, t in ((stem + down, a), (stem + up, b))}
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


CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def ema_file(checkpoints: Sequence[str | Path], decay: float, out: str | Path,
             weight_name: str = "pytorch_lora_weights.safetensors") -> Path:  # fmt: skip
    """The post-hoc moving average (:func:`qflux.lora.tools.post_hoc_ema`) of the adapter files of checkpoint
    folders (``checkpoint-<step>``, any order; any adapter kind: the average is per tensor, as in training), written
    with the newest one's names and metadata.

    Raises:
        QfluxError: a folder that is not a ``checkpoint-<step>`` with the file, a decay outside [0, 1), or files
            whose tensors differ in names or shapes.
    """
    if not 0 <= decay < 1:
        raise QfluxError(f"--decay must be in [0, 1) (e.g. 0.99); got {decay}")
    found = []
    for c in checkpoints:
        m = CHECKPOINT.search(Path(c).name)
        if m is None or not (Path(c) / weight_name).is_file():
            raise QfluxError(f"'{c}' is not a checkpoint-<step> folder with {weight_name}")
        found.append((int(m.group(1)), Path(c) / weight_name))
    found.sort()
    snapshots = []
    for _, f in found:
        with safe_open(str(f), "pt") as handle:
            snapshots.append({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    first = {k: v.shape for k, v in snapshots[0].items()}
    for (step, f), snap in zip(found, snapshots, strict=True):
        if {k: v.shape for k, v in snap.items()} != first:
            raise QfluxError(f"'{f}' (step {step}) holds other tensors than '{found[0][1]}': not one run")
    averaged = post_hoc_ema([s for s, _ in found], snapshots, decay)
    dtype = next(iter(snapshots[-1].values())).dtype
    with safe_open(str(found[-1][1]), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    made = {"verb": "ema", "decay": decay, "steps": [s for s, _ in found]}
    path = _output(out, [f for _, f in found])
    save_file({k: v.to(dtype).contiguous() for k, v in averaged.items()}, str(path),
              metadata={**metadata, "format": "pt", TOOL_KEY: json.dumps(made)})  # fmt: skip
    return path
