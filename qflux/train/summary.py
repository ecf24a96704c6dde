"""What a run says at its start and its end: plain text built from plain values (the recipe prints it).

The start block names the model (and how its layers are stored), the devices, the dataset and its
size groups, the batch arithmetic, the steps, the compile mode and the output folder; the end block
lists every file written and the app each is for, the last checkpoint, the TensorBoard command and
the loss as the same mean the progress bar shows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from qflux.data.pairs import PairSample
from qflux.weights.quantize import LayerCount

LOSS_WINDOW = 10
"""Optimizer steps in the progress bar's mean loss (and the end summary's)."""
FOR_APP = {
    "pytorch_lora_weights.safetensors": "diffusers: pipe.load_lora_weights(folder); qflux: predict --lora",
    "pytorch_lora_weights_comfyui.safetensors": "ComfyUI: this one, in models/loras/, a LoraLoaderModelOnly node",
    "pytorch_lora_weights_ema.safetensors": "the moving average (train.ema_decay), diffusers format",
    "pytorch_lora_weights_ema_comfyui.safetensors": "the moving average, for ComfyUI",
    "config.yaml": "the resolved config (--config= reruns it)",
    "loss.png": "loss per step with its moving average",
    "sample.png": "control | target | before | after",
}
FOR_APP_LYCORIS = {
    "pytorch_lora_weights.safetensors": "LyCORIS with diffusers' module names: qflux predict --lora (not diffusers)",
    "pytorch_lora_weights_comfyui.safetensors": "ComfyUI: this one (LyCORIS, ComfyUI's names), LoraLoaderModelOnly",
    "pytorch_lora_weights_ema.safetensors": "the moving average (train.ema_decay), LyCORIS, diffusers' names",
    "pytorch_lora_weights_ema_comfyui.safetensors": "the moving average, for ComfyUI",
}
"""What each file is for when the adapter is LoKr or LoHa (diffusers cannot load them)."""


@attrs.frozen
class RunStart:
    """What a training run is about to do, for the start block."""

    pipeline: str
    model: str
    dtype: str
    quantize: str
    layers: LayerCount
    devices: Mapping[str, str]
    """{component: device} of what is loaded (the encoders absent when training from the cache)."""
    samples: Sequence[PairSample]
    dataset: str
    buckets: str
    """``data.buckets``: how the samples were sized ("auto": aspect-ratio buckets; "exact")."""
    micro_batch: int
    accumulation: int
    ranks: int
    steps: int
    start_step: int
    compile_mode: str
    output: Path
    adapter: str = "lora"
    """The adapter: kind, rank, alpha, targets."""
    optimizer: str = "adamw"
    """The optimizer and its learning rate."""


def size_text(n: float) -> str:
    """Bytes as GiB (or MiB under one GiB), two decimals."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def size_groups(samples: Sequence[PairSample]) -> list[tuple[str, int]]:
    """(resolution, pairs) of each size group a batch can hold (a bucket), most pairs first. The
    resolution is the target's w×h, followed by the control images' sizes where they differ."""

    def label(s: PairSample) -> str:
        target = f"{s.target_size[0]}×{s.target_size[1]}"
        if all(c == s.target_size for c in s.control_sizes):
            return target
        return f"{target} (control {', '.join(f'{w}×{h}' for w, h in s.control_sizes)})"

    return Counter(label(s) for s in samples).most_common()


TABLE_ROWS = 12
"""Bucket-table rows the start block prints (the rest are counted)."""


def start_block(plan: RunStart) -> str:
    """The lines printed before the first step."""
    stored = plan.dtype
    if plan.quantize != "none":
        stored += f", {plan.quantize}: {plan.layers.quantized} linear layers quantized"
        if plan.layers.kept:
            stored += f", {plan.layers.kept} kept in {plan.dtype} (a shape the kernels cannot take)"
    groups = size_groups(plan.samples)
    kind = "bucket(s)" if plan.buckets == "auto" else "size group(s)"
    table = [f"{size}: {n} pair{'s' * (n != 1)}" for size, n in groups[:TABLE_ROWS]]
    if len(groups) > TABLE_ROWS:
        table.append(f"... {len(groups) - TABLE_ROWS} more ({sum(n for _, n in groups[TABLE_ROWS:])} pairs)")
    effective = plan.micro_batch * plan.accumulation * plan.ranks
    compiling = {"none": "eager (no compile)", "full": "the whole step", "regional": "each repeated block"}
    compile_line = compiling.get(plan.compile_mode, plan.compile_mode)
    if plan.compile_mode != "none":
        compile_line += "; compiling: the first step takes longer"
    steps = f"{plan.steps}" + (f" (resuming at {plan.start_step})" if plan.start_step else "")
    rows = [
        ("model", f"{plan.model} ({stored})"),
        ("devices", ", ".join(f"{k} {v}" for k, v in plan.devices.items())),
        ("dataset", f"{plan.dataset}: {len(plan.samples)} pairs in {len(groups)} {kind}"),
        *(("", row) for row in table),
        (
            "batch",
            f"{plan.micro_batch} per micro-batch × {plan.accumulation} accumulated × {plan.ranks} rank(s) "
            f"= {effective} samples per step",
        ),
        ("steps", steps),
        ("adapter", plan.adapter),
        ("optim", plan.optimizer),
        ("compile", compile_line),
        ("output", str(plan.output)),
    ]
    return "\n".join([f"{plan.pipeline} LoRA training", *(f"  {k:<8} {v}" for k, v in rows)])


NAMED = 4
"""Names a grouped line lists before it counts the rest."""


def unreached_text(modules: Sequence[str]) -> str:
    """The line under the start block naming the adapter layers whose output never reaches the loss."""
    shown = ", ".join(modules[:NAMED]) + (f", … (+{len(modules) - NAMED} more)" if len(modules) > NAMED else "")
    return (
        f"  note     {len(modules)} adapter layer(s) get no gradient (the loss does not depend on their output, "
        f"e.g. a last block's dropped text stream; they keep ΔW = 0): {shown}"
    )


def mean_loss(losses: Sequence[float], window: int = LOSS_WINDOW, *, first: bool = False) -> float:
    """The mean of the last (or, ``first``, the first) ``window`` finite losses: the progress bar's."""
    part = [x for x in (losses[:window] if first else losses[-window:]) if x == x]
    return sum(part) / len(part) if part else float("nan")


def comfyui_note(kind: str, scale: float, drops: Sequence[str]) -> str | None:
    """One line on what ComfyUI would make of the diffusers-format file (None: it loads whole there):
    the modules it has no diffusers name for (:func:`qflux.lora.kinds.comfy_drops`) and, for a LoRA
    without per-layer ``.alpha``, the strength 1 it applies instead of α/r."""
    lost = []
    if drops:
        names = ", ".join(drops[:NAMED]) + (", …" if len(drops) > NAMED else "")
        lost.append(f"lose {len(drops)} adapted layer(s) ({names})")
    if kind in ("lora", "dora") and abs(scale - 1.0) > 1e-12:
        lost.append(f"apply at strength 1, not α/r = {scale:g}")
    if kind == "dora":
        lost.append("render DoRA otherwise (it divides by ‖W‖)")
    if not lost:
        return None
    return "ComfyUI: load the _comfyui file (train.lora_format: both writes it); the diffusers-format file would " + (
        " and ".join(lost) + " there"
    )


def sample_line(before: tuple[float, float], after: tuple[float, float]) -> str:
    """``sample.png: edit PSNR 8.1 dB before → 17.9 dB after where the pair changes (31.0 → 33.2 dB where it
    does not)``, from (psnr_changed, psnr_unchanged) of the base model and of the LoRA; a region the pair does
    not have (an all-changed edit has no unchanged pixels) is left out."""

    def db(x: float) -> str:
        return f"{x:.1f} dB" if math.isfinite(x) else "n/a"

    line = f"sample.png: edit PSNR {db(before[0])} before → {db(after[0])} after where the pair changes"
    if math.isfinite(before[1]) and math.isfinite(after[1]):
        line += f" ({db(before[1])} → {db(after[1])} where it does not)"
    return line


def end_block(
    written: Sequence[Path],
    *,
    losses: Sequence[float],
    checkpoint: Path | None,
    logs: Path | None,
    lycoris: bool = False,
    comfyui: str | None = None,
    edit: tuple[tuple[float, float], tuple[float, float]] | None = None,
) -> str:
    """The lines printed when a run finishes (``lycoris``: the LoRA files are LoKr / LoHa; ``comfyui``:
    :func:`comfyui_note`'s line; ``edit``: sample.png's (psnr_changed, psnr_unchanged) before and after)."""
    lines = []
    if losses:
        n = min(LOSS_WINDOW, len(losses))
        lines.append(
            f"done: {len(losses)} steps; loss (mean of {n} steps, as the progress bar) "
            f"{mean_loss(losses, n, first=True):.4f} at the start → {mean_loss(losses, n):.4f} at the end"
        )
    if edit is not None:
        lines.append(sample_line(*edit))
    lines.append("wrote:")
    width = max((len(str(p)) for p in written), default=0)
    uses = {**FOR_APP, **FOR_APP_LYCORIS} if lycoris else FOR_APP
    lines += [f"  {p!s:<{width}}  {uses.get(p.name, '')}".rstrip() for p in written]
    if comfyui is not None:
        lines.append(comfyui)
    if checkpoint is not None:
        lines.append(
            f"last checkpoint: {checkpoint} (--resume_from_checkpoint=latest with a larger train.max_train_steps "
            "trains on from it)"
        )
    if logs is not None:
        lines.append(f"watch: tensorboard --logdir {logs}")
    return "\n".join(lines)
