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
from qflux.lora.formats import peft_scale
from qflux.lora.kinds import read_adapter_file
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

    def tensors(self) -> dict[str, torch.Tensor]:
        """The layers under their spelling's down / up keys (the scale folded in: α = r)."""
        down, up = SPELLINGS[self.spelling]
        return {k: t for stem, (a, b) in self.layers.items() for k, t in ((stem + down, a), (stem + up, b))}


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
        scale = float(alpha) / rank if alpha is not None else scale_of(module_name(stem), rank)
        layers[stem] = (down.float(), up.float() * scale)
    if not layers:
        raise QfluxError(f"'{path}' holds no LoRA tensors (lora_A/lora_B or lora_down/lora_up): it is not a LoRA")
    return LoraFile(layers, spelling, metadata)


def module_name(stem: str) -> str:
    """A diffusers stem's module name (``transformer.`` dropped), as the peft config names it."""
    return stem.removeprefix("transformer.")


def write_lora_file(lora: LoraFile, out: str | Path, inputs: Sequence[str | Path], made_by: Mapping[str, Any]) -> Path:
    """Write ``lora`` in its spelling at scale 1 (α = r: every layer's B carries its scale), with ``made_by``
    in the metadata.

    Raises:
        QfluxError: ``out`` is one of ``inputs`` (an input is never written over).
    """
    path = output_path(out, inputs)
    sd = {k: t.contiguous() for k, t in lora.tensors().items()}
    if lora.spelling != "diffusers":
        sd |= {stem + ".alpha": torch.tensor(float(a.shape[0])) for stem, (a, _) in lora.layers.items()}
    metadata = {**lora.metadata, "format": "pt", TOOL_KEY: json.dumps(dict(made_by))}
    if "lora_adapter_metadata" in metadata:  # the peft config: α = r for every layer (scale 1)
        ranks = {module_name(s): a.shape[0] for s, (a, _) in lora.layers.items()}
        r = max(ranks.values())
        pattern = {m: k for m, k in ranks.items() if k != r}  # α = r everywhere: a layer of another rank names both
        config = json.loads(metadata["lora_adapter_metadata"])
        config |= {"r": r, "lora_alpha": r, "use_rslora": False, "rank_pattern": pattern, "alpha_pattern": pattern}
        metadata["lora_adapter_metadata"] = json.dumps(config)
    save_file(sd, str(path), metadata=metadata)
    return path


def output_path(out: str | Path, inputs: Sequence[str | Path]) -> Path:
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
    """What ``inspect`` prints: the spelling, the layers, ranks and targets, and each layer's ‖ΔW‖_F (LoKr, LoHa and
    DoRA files: their kind, settings, layers and targets)."""
    kind, meta, stored = read_adapter_file(path, "the LoRA file")
    if kind != "lora":
        stems = sorted({k.rsplit(".", 1)[0].split(".lora_")[0] for k in stored if not k.endswith(".alpha")})
        settings = ", ".join(f"{k} {meta[k]}" for k in ("r", "lora_alpha", "alpha", "decompose_both") if k in meta)
        return [f"file      {path}", f"kind      {kind}, {len(stems)} layers, {settings}",
                f"targets   {', '.join(sorted({_target(s) for s in stems}))}"]  # fmt: skip
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
    path = output_path(out, [f for _, f in found])
    save_file({k: v.to(dtype).contiguous() for k, v in averaged.items()}, str(path),
              metadata={**metadata, "format": "pt", TOOL_KEY: json.dumps(made)})  # fmt: skip
    return path
