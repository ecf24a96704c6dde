"""A recipe's training loop and its ending: the hooks (progress bar, logging, validation,
checkpoints) around :func:`qflux.train.loop.run_loop`, then the outputs (the LoRA files first, the sample,
the end summary). Each hook takes and returns the :class:`~qflux.train.loop.LoopState`; what it closes
over is fixed for the run (the tracker, the bar, the writers)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from qflux.config.errors import QfluxError
from qflux.config.parse import to_dict
from qflux.config.schema import RecipeConfig
from qflux.data.images import load_rgb, to_image, to_pil
from qflux.data.order import batch_stream
from qflux.data.pairs import PairSample
from qflux.lora.adapter import (
    COMFYUI_WEIGHT_NAME,
    EMA_COMFYUI_WEIGHT_NAME,
    EMA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    save_lora,
    save_lora_comfyui,
)
from qflux.lora.kinds import LYCORIS, comfy_drops, module_of
from qflux.train.batch import Conditioning, DataPath
from qflux.train.checkpoint import latest_checkpoint, save_loop_state
from qflux.train.distributed import any_rank, barrier
from qflux.train.family import Family
from qflux.train.loop import Hook, LoopState, flush, mean_recent, run_loop
from qflux.train.plots import save_image_row, save_loss_curve
from qflux.train.run import ModelOps, Run, RunResult
from qflux.train.signals import stop_signals
from qflux.train.start import announce, attach_lora, build_step, first_state, step_taker
from qflux.train.state import LossFn, unreached_adapters
from qflux.train.summary import LOSS_WINDOW, comfyui_note, end_block, unreached_text
from qflux.train.tracking import Tracker, open_tracker
from qflux.train.validation import edit_metrics, edit_reference, make_validator
from qflux.weights.dtypes import torch_dtype

Render = Callable[[Sequence[Conditioning], Sequence[Mapping[str, torch.Tensor]]], list[np.ndarray]]


def decoder(
    decode: Callable[[Any, torch.Tensor], torch.Tensor], vae: Any, load_vae: Callable[[], Any]
) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
    """``decode_all(latents) → images`` with ``vae``, or (training from the cache: ``vae`` is None)
    with a VAE loaded by ``load_vae`` for the call alone, so rendering holds no memory between calls."""

    def decode_all(latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        model = vae if vae is not None else load_vae()
        return [decode(model, z) for z in latents]

    return decode_all


def renderer(cfg: RecipeConfig, ops: ModelOps) -> Render:
    """``render(conds, loras)``: each one-sample conditioning denoised with its LoRA at its target
    size (``validation.num_inference_steps``, the run's seed), decoded to [H, W, 3] in [0, 1]."""

    def render(conds: Sequence[Conditioning], loras: Sequence[Mapping[str, torch.Tensor]]) -> list[np.ndarray]:
        steps = cfg.validation.num_inference_steps
        latents = [ops.preview(c, lora, steps) for c, lora in zip(conds, loras, strict=True)]
        return [to_image(x) for x in ops.decode(latents)]

    return render


def _log(
    state: LoopState, *, tracker: Tracker, bar: Any, seconds: list[float], cfg: RecipeConfig, out: Path
) -> LoopState:
    """Read the pending metrics (one host sync), stop on a run of non-finite steps, update the bar's
    mean loss and send each step's scalars to the tracker."""
    state, rows = flush(state)
    if not rows:
        return state
    limit = cfg.train.max_nonfinite_steps
    worst, skipped = (int(x) for x in torch.stack([state.worst, state.skipped]).tolist())
    if worst >= limit:
        raise QfluxError(
            f"stopped at step {state.step}: {limit} steps in a row had a non-finite loss or gradient (their updates "
            f"were skipped); the last checkpoint is {latest_checkpoint(out) or 'none'}. Lower optimizer.lr or "
            "check the data, then resume from that checkpoint"
        )
    bar.set_postfix(loss=f"{mean_recent(state.losses, LOSS_WINDOW):.4f}", lr=f"{rows[-1]['lr']:.2e}", skipped=skipped)
    first = state.step - len(rows) + 1
    window_s = sum(seconds[-len(rows) :])
    rate = len(rows) / window_s if window_s > 0 else float("nan")
    samples_rate = sum(r["samples"] for r in rows) / window_s if window_s > 0 else float("nan")
    for i, row in enumerate(rows):
        values = {k: row[n] for k, n in (("train/loss", "loss"), ("train/grad_norm", "grad_norm"), ("train/lr", "lr"),
                                         ("train/samples", "samples"))}  # fmt: skip
        if i == len(rows) - 1:
            values |= {"train/steps_per_s": rate, "train/samples_per_s": samples_rate}
        tracker.scalars(first + i, values)
    return state


def _checkpoint(
    state: LoopState,
    *,
    log: Callable[[LoopState], LoopState],
    cfg: RecipeConfig,
    run: Run,
    write_lora: Callable[..., Any],
) -> LoopState:
    """Flush, then write ``checkpoint-<step>`` (rank 0) with the loss curve; every rank waits for it."""
    state = log(state)
    if run.world.is_main:
        save_loop_state(run.output, state, to_dict(cfg), write_lora=partial(write_lora, lora=state.train.lora),
                        total_limit=cfg.train.checkpoints_total_limit)  # fmt: skip
        if state.losses:
            save_loss_curve(state.losses, run.output / "loss.png")
    barrier(run.world)
    return state


def train_loop(
    cfg: RecipeConfig, run: Run, state: LoopState, data: DataPath, loss_fn: LossFn, models: Any, ops: ModelOps
) -> tuple[LoopState, bool, list[float]]:
    """Train until ``train.max_train_steps`` (or SIGINT/SIGTERM, which checkpoint and stop): the
    step, then its hooks. Returns (state, whether a signal stopped it, each step's seconds)."""
    transformer = models.transformer
    stream = batch_stream(
        data.make_dataset(run.samples), run.samples, cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
        num_workers=cfg.data.num_workers, collate_fn=data.collate, start=state.position,
        shard=(run.world.rank, run.world.size), drop_last=cfg.data.drop_last,
    )  # fmt: skip
    first = report_unreached(loss_fn, state.train.lora, transformer, run.world.is_main)
    take = step_taker(cfg, run, build_step(cfg, run, loss_fn, transformer), stream, data, ops,
                      models.scheduler.config, first)  # fmt: skip
    tracker = open_tracker(cfg.logging.report_to if run.world.is_main else "none", run.output / cfg.logging.logging_dir)
    seconds: list[float] = []
    write = partial(
        save_lora, transformer=transformer, dtype=torch_dtype(cfg.train.save_dtype), pipeline_cls=ops.pipeline_cls
    )
    with stop_signals() as stopped, tqdm(initial=state.step, total=cfg.train.max_train_steps, desc="train",
                                         unit="step", disable=not run.world.is_main) as bar:  # fmt: skip
        log = partial(_log, tracker=tracker, bar=bar, seconds=seconds, cfg=cfg, out=run.output)
        hooks = [Hook(1, lambda s: (bar.update(1), s)[1]), Hook(LOSS_WINDOW, log, on_stop=True)]
        if run.held_out is not None:
            validate = make_validator(cfg, run.held_out, data, loss_fn, ops.to_batch, renderer(cfg, ops), tracker,
                                      run.device, models.scheduler.config, run.world.is_main)  # fmt: skip
            hooks.append(Hook(cfg.validation.validation_steps, lambda s: validate(log(s))))
            if state.step < cfg.train.max_train_steps:
                state = validate(state)  # before the first step of this run
        ckpt = partial(_checkpoint, log=log, cfg=cfg, run=run, write_lora=lambda folder, lora: write(folder, lora=lora))
        hooks.append(Hook(cfg.train.checkpointing_steps, ckpt, on_stop=True))

        def stop_requested() -> bool:
            if run.world.size > 1 and any_rank(bool(stopped), run.device) and not stopped:
                stopped.append("another rank's stop request")
            return bool(stopped)

        state, interrupted = run_loop(state, take, hooks, until=cfg.train.max_train_steps, stopped=stop_requested,
                                      seconds=seconds)  # fmt: skip
        if interrupted:
            bar.write(
                f"interrupted by {stopped[0]} at step {state.step}; saved {run.output / f'checkpoint-{state.step}'}. "
                "Resume with the same command plus --resume_from_checkpoint=latest"
            )
    tracker.close()
    return state, interrupted, seconds


def write_outputs(cfg: RecipeConfig, run: Run, transformer: Any, lora: Mapping[str, torch.Tensor], ops: ModelOps,
                  losses: Sequence[float], ema: Mapping[str, torch.Tensor] | None = None) -> list[Path]:  # fmt: skip
    """The final LoRA (the diffusers file first: it is the one every tool reads), then its ComfyUI
    twin, the moving average's pair when there is one, the resolved config and the loss curve;
    returns the paths written, in that order."""
    out, dtype = run.output, torch_dtype(cfg.train.save_dtype)
    written = []
    names = [(lora, LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME)]
    if ema is not None:
        names.append((ema, EMA_WEIGHT_NAME, EMA_COMFYUI_WEIGHT_NAME))
    for tensors, diffusers_name, comfyui_name in names:
        if cfg.train.lora_format in ("diffusers", "both"):
            written.append(save_lora(out, transformer, tensors, dtype=dtype, pipeline_cls=ops.pipeline_cls,
                                     weight_name=diffusers_name))  # fmt: skip
        if cfg.train.lora_format in ("comfyui", "both") and cfg.model.lora.kind != "dora":  # DoRA: diffusers only
            written.append(save_lora_comfyui(out, transformer, tensors, dtype=dtype, naming=ops.naming,
                                             file_name=comfyui_name))  # fmt: skip
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    return [*written, out / "config.yaml", save_loss_curve(losses, out / "loss.png")]


def _save_sample(sample: PairSample, before: np.ndarray, after: np.ndarray, path: Path) -> Path:
    """control image(s) | target | base model | with LoRA (same seed for both predictions)."""
    controls = [load_rgb(c) for c in sample.controls]
    labels = ["control"] if len(controls) == 1 else [f"control {i + 1}" for i in range(len(controls))]
    images = [*controls, load_rgb(sample.target), to_pil(before), to_pil(after)]
    return save_image_row(images, [*labels, "target", "before", "after"], path)


def finish(
    cfg: RecipeConfig,
    run: Run,
    state: LoopState,
    lora0: Mapping[str, torch.Tensor],
    models: Any,
    data: DataPath,
    ops: ModelOps,
    interrupted: bool,
    seconds: list[float],
) -> RunResult:
    """Write the outputs of a run that reached its last step (rank 0; every rank renders the sample,
    which a sharded base needs) and print the end summary."""
    lora_path = run.output / "pytorch_lora_weights.safetensors"
    if not interrupted:
        transformer = models.transformer
        written = (
            write_outputs(cfg, run, transformer, state.train.lora, ops, state.losses, state.train.ema)
            if run.world.is_main else []
        )  # fmt: skip
        lora_path = written[0] if written else lora_path
        edit = None
        if cfg.logging.write_sample:
            cond = data.to_conditioning(data.collate([data.make_dataset(run.samples[:1])[0]]))
            before, after = renderer(cfg, ops)([cond, cond], [lora0, state.train.lora])
            if run.world.is_main:
                written.append(_save_sample(run.samples[0], before, after, run.output / "sample.png"))
                ref = edit_reference(run.samples[0])
                edit = (edit_metrics(before, ref), edit_metrics(after, ref))
        barrier(run.world)
        logs = run.output / cfg.logging.logging_dir if cfg.logging.report_to == "tensorboard" else None
        lo = cfg.model.lora
        drops = comfy_drops(sorted({module_of(k) for k in lora0}), ops.naming)
        note = comfyui_note(lo.kind, lo.lora_alpha / lo.r, drops) if cfg.train.lora_format != "comfyui" else None
        print(end_block(written, losses=state.losses, checkpoint=latest_checkpoint(run.output), logs=logs,
                        lycoris=cfg.model.lora.kind in LYCORIS, comfyui=note, edit=edit))  # fmt: skip
    return RunResult(cfg, state.train, dict(lora0), list(state.losses), seconds, models, lora_path, interrupted)


def train_lora(cfg: RecipeConfig, run: Run, family: Family, models: Any, data: DataPath, ops: ModelOps) -> RunResult:
    """The steps every recipe takes once its models and data are in hand: the adapter attached, the
    loss ``ops.make_loss(transformer)`` built on the adapted transformer, the first state (fresh or
    resumed) announced, the loop run, and the outputs written (:func:`finish`)."""
    lora0 = attach_lora(models.transformer, cfg, run, naming=ops.naming, pipeline_cls=ops.pipeline_cls)
    loss_fn: LossFn = ops.make_loss(models.transformer)
    state = first_state(cfg, run, lora0)
    announce(cfg, run, models, ("transformer", *family.encoders), state, family.pipeline)
    state, interrupted, seconds = train_loop(cfg, run, state, data, loss_fn, models, ops)
    return finish(cfg, run, state, lora0, models, data, ops, interrupted, seconds)


def report_unreached(
    loss_fn: LossFn, lora: Mapping[str, torch.Tensor], module: Any, main: bool
) -> Callable[[Any], None]:
    """``first(batch)`` for :func:`step_taker`: finds the adapter layers the loss does not reach
    (:func:`qflux.train.state.unreached_adapters`; every rank, as FSDP's collectives need) and names them
    under the start block (rank 0). They train with a zero gradient and keep ΔW = 0."""

    def first(batch: Any) -> None:
        names = unreached_adapters(loss_fn, lora, batch, module)
        if names and main:
            tqdm.write(unreached_text(names))

    return first
