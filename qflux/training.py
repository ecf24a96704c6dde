"""What every LoRA recipe's training run does around its model: the run's setting, the adapter, the
first state, the loop with its hooks, and the outputs. The recipes call these by name, in order;
what differs between models (loading, conditioning, the loss, previews) is theirs.

    with training_run(cfg, ...) as run:           # device, ranks, model folder, data, resume point
        models, data = <the model's inputs>         # encoders, or the cache
        lora0 = attach_lora(transformer, cfg, run, ...)
        state = first_state(cfg, run, lora0)       # fresh, or the checkpoint's LoopState
        state, stopped, seconds = train_loop(cfg, run, state, data, loss_fn, models, ops)
        return finish(cfg, run, state, lora0, models, ops, stopped, seconds)
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch
from tqdm import tqdm

from qflux.adapter_kinds import module_of
from qflux.batching import Conditioning, DataPath, Draws, Prepared, prepare
from qflux.block_swap import block_count, swap_blocks, swap_problem, swapped_bytes, transformer_blocks
from qflux.builtin import resolve_dataset_path, resolve_model_path
from qflux.checkpoint import (
    incompatibilities,
    latest_checkpoint,
    load_checkpoint,
    load_loop_state,
    remove_partial,
)
from qflux.config import LoraConfig, OptimizerConfig, RecipeConfig
from qflux.config_parse import to_dict
from qflux.data import PairDataset, PairRule, PairSample, scan_pairs
from qflux.devices import component_devices, resolve_device
from qflux.distributed import World, all_reduce_sum, init_world, rank_device, shard_frozen_base
from qflux.errors import QfluxError
from qflux.fp8 import check_fp8_device
from qflux.frozen_linear import prepare_frozen_base
from qflux.latents import size_multiple, vae_scale_factor
from qflux.loading import component_config
from qflux.loop import LoopState, advance, start_state
from qflux.lora import LORA_WEIGHT_NAME, inject_lora, lora_from_file
from qflux.lora_formats import Naming, check_convertible
from qflux.model_dir import resolve_model_dir
from qflux.pair_checks import check_pairs
from qflux.prodigy import ProdigyHParams
from qflux.quantize import count_layers
from qflux.run_dir import claim_output_dir
from qflux.schedules import learning_rate
from qflux.stream import check_batches
from qflux.summary import RunPlan, size_text, start_block
from qflux.train_state import (
    CompileMode,
    LossFn,
    StepFn,
    StepHParams,
    TrainState,
    grad_engine,
    init_train_state,
    make_train_step,
    resolve_compile,
)
from qflux.validation import ValidationSet, validation_set

RESUME_KEYS = [
    "model.pretrained_model_name_or_path",
    "model.variant",
    "model.lora.r",
    "model.lora.lora_alpha",
    "model.lora.target_modules",
    "model.lora.kind",
    "optimizer.name",
    "seed",
]
"""Keys that must match to resume: the LoRA's shape and kind, the optimizer, the base model, its
conditioning and the random draws (a key a model lacks reads as null in both)."""
RESUME_DEFAULTS = {"model.lora.kind": "lora", "optimizer.name": "adamw"}
"""What a checkpoint written before a key existed had."""


@attrs.frozen(eq=False)
class ModelOps:
    """The model's own functions the shared loop calls (its recipe builds them)."""

    to_batch: Callable[[Prepared], Any]
    """The model's batch record from prepared tensors."""
    preview: Callable[[Conditioning, Mapping[str, torch.Tensor], int], torch.Tensor]
    """``preview(cond, lora, steps) → latents`` [1, C, h, w]: one sample denoised at its target
    size with the run's seed (validation, sample.png)."""
    decode: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]
    """Latents → images [1, 3, H, W] in [-1, 1] (loading the VAE for the call if it is not loaded)."""
    naming: Naming
    """How the model's ComfyUI files name modules."""
    pipeline_cls: type
    """The diffusers pipeline class (LoRA files are written and read through it)."""


@attrs.frozen(eq=False)
class RunResult:
    """What a finished training run hands back to an in-process caller (tests, notebooks)."""

    config: Any
    state: TrainState
    initial_lora: dict[str, torch.Tensor]
    losses: list[float]
    step_seconds: list[float]
    """Wall time of each optimizer step, batch preparation included."""
    models: Any
    lora_path: Path
    interrupted: bool = False
    """True when SIGINT/SIGTERM stopped the run (a checkpoint was saved; no final outputs)."""


@attrs.frozen(eq=False)
class Run:
    """A training run's setting, known before any model loads."""

    world: World
    device: torch.device
    """Where the transformer trains (this rank's device)."""
    model_dir: Path
    samples: list[PairSample]
    held_out: ValidationSet | None
    compile_mode: CompileMode
    resume_from: Path | None
    output: Path
    finished: RunResult | None
    """Set when the checkpoint to resume already reached train.max_train_steps (nothing to do)."""


def model_folder(name: str, variant: str | None, components: Sequence[str], pipeline: str) -> Path:
    """The resolved model folder of ``model.pretrained_model_name_or_path`` (built-in names built)."""
    return resolve_model_dir(resolve_model_path(name, variant), components, pipeline=pipeline)


def pair_dataset(cfg: RecipeConfig, path: Path) -> Callable[[Sequence[PairSample]], PairDataset]:
    """The uncached runs' dataset over samples, with the change masks ``train.loss_mask`` asks for
    on the latent grid of the model in ``path``."""
    factor = vae_scale_factor(component_config(path, "vae"))
    return partial(PairDataset, mask_mode=cfg.train.loss_mask, vae_factor=factor)


def image_multiple(path: Path) -> int:
    """What image sides are multiples of for the model in ``path``: its VAE factor × 2 (read from
    the VAE's config, :func:`qflux.latents.size_multiple`)."""
    return size_multiple(component_config(path, "vae"))


def dataset_samples(cfg: RecipeConfig, path: Path, rule: PairRule) -> list[PairSample]:
    """The checked dataset, sized for the model in ``path`` (before any model loads)."""
    return samples_at(cfg, image_multiple(path), rule)


def samples_at(cfg: RecipeConfig, multiple: int, rule: PairRule) -> list[PairSample]:
    """The checked dataset with image sides multiples of ``multiple``: in aspect-ratio buckets
    (``data.buckets: auto``) or each image at its own size (``exact``)."""
    return scan_pairs(
        resolve_dataset_path(cfg.data.dataset_path),
        cfg.data.max_pixels,
        multiple=multiple,
        skip_invalid=cfg.data.skip_invalid,
        warn=tqdm.write,
        controls=rule.controls,
        buckets=cfg.data.buckets,
        control_sizing=rule.control_sizing,
    )


def placements(cfg: RecipeConfig, run: Run | None = None) -> dict[str, torch.device]:
    """{component: device} of ``devices``, the transformer on the run's own device when training (on
    the host with ``train.blocks_to_swap``: :func:`attach_lora` moves all but the swapped weights)."""
    if run is None:
        return component_devices(cfg.devices)
    host = cfg.train.blocks_to_swap > 0
    return component_devices(cfg.devices) | {"transformer": torch.device("cpu") if host else run.device}


def quiet_unless(main: bool) -> contextlib.AbstractContextManager[Any]:
    """Ranks other than 0 print nothing (their progress bars are off too)."""
    return contextlib.nullcontext() if main else contextlib.redirect_stdout(io.StringIO())


def _compile_mode(cfg: RecipeConfig, device: torch.device, world: World, path: Path) -> CompileMode:
    """``train.compile`` for this device (``auto`` is eager with block swap and with DoRA), refused
    (before any model loads) where it cannot run; block swap is checked here too."""
    swap, dora = cfg.train.blocks_to_swap, cfg.model.lora.kind == "dora"
    eager = (swap or dora) and cfg.train.compile == "auto"
    mode = "none" if eager else resolve_compile(cfg.train.compile, device)
    if dora and mode != "none":
        raise QfluxError(
            f"train.compile: {cfg.train.compile} cannot trace peft's DoRA layers (their weight lookup breaks the "
            "graph); use train.compile: auto or false with model.lora.kind: dora"
        )
    problem = swap_problem(swap, blocks=block_count(component_config(path, "transformer")),
                           quantize=cfg.model.quantize, fp8_matmul=cfg.train.fp8_matmul, compile_mode=mode,
                           fsdp=world.size > 1 and cfg.train.distributed == "fsdp")  # fmt: skip
    if problem is not None:
        raise QfluxError(problem)
    if world.size > 1 and mode == "full":
        raise QfluxError("train.compile: true cannot run under torchrun (collectives in the graph); use regional")
    if cfg.train.fp8_matmul:
        check_fp8_device(device)
    if mode == "full" and cfg.model.quantize != "none":
        raise QfluxError(
            f"train.compile: true (one graph through torch.func) cannot differentiate the {cfg.model.quantize} "
            "layers of model.quantize; use train.compile: regional (or auto, or false)"
        )
    return mode


def check_adapter_settings(cfg: RecipeConfig) -> None:
    """Refuse adapter settings that cannot work together, naming the fix.

    Raises:
        QfluxError: DoRA with a ComfyUI file or with block swap.
    """
    if cfg.model.lora.kind != "dora":
        return
    if cfg.train.lora_format == "comfyui":
        raise QfluxError(
            "train.lora_format: comfyui cannot hold a DoRA (ComfyUI divides by ‖W‖ where DoRA divides by ‖W+ΔW‖, so "
            "its image would differ); set train.lora_format: diffusers, which diffusers' load_lora_weights reads"
        )
    if cfg.train.blocks_to_swap:
        raise QfluxError(
            "model.lora.kind: dora reads each adapted layer's whole weight (its norm) every step, which block swap "
            "keeps on the host; set train.blocks_to_swap: 0, or use another model.lora.kind (lokr, loha, lora)"
        )


@contextlib.contextmanager
def training_run(
    cfg: RecipeConfig, *, pipeline: str, components: Sequence[str], rule: PairRule, variant: str | None
) -> Iterator[Run]:
    """Set a run up: device and ranks (only rank 0 prints), the model folder, the checked dataset and
    validation set, the compile mode, and the output folder (resumed, refused while it holds another
    run, or emptied with logging.overwrite). Under torchrun, trains data-parallel."""
    if cfg.validation.use_ema and cfg.train.ema_decay is None:
        raise QfluxError(
            "validation.use_ema: true validates the LoRA's moving average; set train.ema_decay (e.g. 0.99)"
        )
    check_adapter_settings(cfg)
    device = resolve_device(cfg.devices.transformer, key="devices.transformer")
    world = init_world(device.type)
    if cfg.model.lora.kind == "dora" and world.size > 1 and cfg.train.distributed == "fsdp":
        raise QfluxError(
            "model.lora.kind: dora reads each adapted layer's whole weight (its norm) every step, which FSDP2 "
            "shards across ranks; use train.distributed: ddp, or another model.lora.kind"
        )
    device = rank_device(world, device)
    with quiet_unless(world.is_main):
        path = model_folder(cfg.model.pretrained_model_name_or_path, variant, components, pipeline)
        samples = dataset_samples(cfg, path, rule)
        if world.is_main:  # the warnings are printed by rank 0 alone: the others need not decode the pairs
            for line in check_pairs(samples, progress=partial(tqdm, desc="checking pairs", unit="pair", leave=False)):
                print(line)
        check_batches(samples, cfg.data.batch_size, world.size, drop_last=cfg.data.drop_last)
        mode = _compile_mode(cfg, device, world, path)
        held = None
        if cfg.validation.enabled:
            held = validation_set(
                cfg.validation, cfg.data.dataset_path, cfg.data.max_pixels, multiple=image_multiple(path), rule=rule
            )
        out = Path(cfg.output_dir)
        resume_from = _checkpoint_to_resume(cfg)
        finished = _finished(cfg, resume_from) if resume_from is not None else None
        if finished is None and world.is_main:
            _prepare_output(cfg, out, fresh=resume_from is None)
        yield Run(world, device, path, samples, held, mode, resume_from, out, finished)


def _checkpoint_to_resume(cfg: RecipeConfig) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` names (``latest``: the newest one), or None."""
    where = cfg.resume_from_checkpoint
    if where is None:
        return None
    path = latest_checkpoint(cfg.output_dir) if where == "latest" else Path(where)
    if path is None:
        print(f"no checkpoint in '{cfg.output_dir}' yet: starting fresh")
    return path


def _finished(cfg: RecipeConfig, path: Path) -> RunResult | None:
    """A run whose checkpoint already reached ``train.max_train_steps``: said, and nothing changes."""
    ckpt = load_checkpoint(path)
    if ckpt.state.step < cfg.train.max_train_steps:
        return None
    print(
        f"the run in '{cfg.output_dir}' has finished: {path.name} is at step {ckpt.state.step} and "
        f"train.max_train_steps is {cfg.train.max_train_steps}; nothing to do (raise train.max_train_steps to "
        "train on)"
    )
    lora_path = Path(cfg.output_dir) / LORA_WEIGHT_NAME
    return RunResult(cfg, ckpt.state, dict(ckpt.state.lora), list(ckpt.meta.get("losses", [])), [], None, lora_path)


def _prepare_output(cfg: RecipeConfig, out: Path, *, fresh: bool) -> None:
    """A fresh run claims the folder (:func:`qflux.run_dir.claim_output_dir`); every run clears the
    temporary folders of checkpoint writes that were killed."""
    if fresh:
        weight = cfg.model.lora.pretrained_weight
        removed = claim_output_dir(
            out,
            logging_dir=cfg.logging.logging_dir,
            overwrite=cfg.logging.overwrite,
            wanted_resume=cfg.resume_from_checkpoint is not None,
            keep={"model.lora.pretrained_weight": Path(weight)} if weight else None,
        )
        if removed:
            names = ", ".join(p.name for p in removed)
            print(f"logging.overwrite: removed the previous run's {len(removed)} item(s) in '{out}': {names}")
    for partial_dir in remove_partial(out):
        print(f"removed '{partial_dir}', left by a checkpoint write that was interrupted")


def attach_lora(transformer: Any, cfg: RecipeConfig, run: Run, *, naming: Naming, pipeline_cls: Any) -> dict[str, Any]:
    """Give the transformer its adapter and choose its training kernels; returns the LoRA's first
    tensors (its init, or ``model.lora.pretrained_weight``'s)."""
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora0 = inject_lora(transformer, cfg.model.lora, seed=cfg.seed)
    if cfg.model.lora.pretrained_weight is not None:
        weight = cfg.model.lora.pretrained_weight
        lora0 = lora_from_file(transformer, weight, lora0, naming=naming, pipeline_cls=pipeline_cls)
    if cfg.train.lora_format != "diffusers" and cfg.model.lora.kind != "dora":  # DoRA has no ComfyUI file
        check_convertible(sorted({module_of(k) for k in lora0}), naming)
    if cfg.train.blocks_to_swap:
        every = transformer_blocks(transformer)
        held = swapped_bytes(every[-cfg.train.blocks_to_swap :])
        swap_blocks(transformer, cfg.train.blocks_to_swap, run.device)
        print(f"block swap: the frozen weights of {cfg.train.blocks_to_swap} of {len(every)} blocks "
              f"({size_text(held)}) stay on the host")  # fmt: skip
    prepare_frozen_base(transformer, fp8_matmul=cfg.train.fp8_matmul, device=run.device, compile_mode=run.compile_mode)
    if run.world.size > 1 and cfg.train.distributed == "fsdp":
        blocks = shard_frozen_base(transformer, run.world)
        print(f"FSDP2: frozen base sharded across {run.world.size} ranks ({blocks} blocks); LoRA replicated")
    return lora0


def first_state(cfg: RecipeConfig, run: Run, lora0: Mapping[str, torch.Tensor]) -> LoopState:
    """The loop state to start from: fresh, or the checkpoint to resume (checked against this run)."""
    averaged = cfg.train.ema_decay is not None
    opt = cfg.optimizer
    fresh = init_train_state({k: v.to(run.device) for k, v in lora0.items()}, cfg.seed, ema=averaged,
                             optimizer=opt.name, prodigy=prodigy_hparams(opt))  # fmt: skip
    if run.resume_from is None:
        return start_state(fresh)
    ckpt = load_checkpoint(run.resume_from)
    differ = incompatibilities(ckpt.config, to_dict(cfg), RESUME_KEYS, RESUME_DEFAULTS)
    shapes = {k: tuple(v.shape) for k, v in ckpt.state.lora.items()}
    if not differ and shapes != {k: tuple(v.shape) for k, v in fresh.lora.items()}:
        differ = ["the LoRA tensors (names or shapes)"]
    if differ:
        raise QfluxError(f"cannot resume from '{run.resume_from}': it differs from this run in " + "; ".join(differ))
    state = load_loop_state(ckpt, run.device, order=list(fresh.lora))  # the straight run's flattening order
    if not averaged and state.train.ema is not None:  # the average is kept only while configured
        state = attrs.evolve(state, train=attrs.evolve(state.train, ema=None))
    print(f"resuming from '{run.resume_from}' at step {state.step}")
    return state


def adapter_text(lora: LoraConfig) -> str:
    """The start block's adapter line: kind, rank, alpha and how many target modules."""
    return f"{lora.kind}, rank {lora.r}, alpha {lora.lora_alpha:g}, on {', '.join(lora.target_modules)}"


def optimizer_text(opt: OptimizerConfig) -> str:
    """The start block's optimizer line (Prodigy: lr multiplies its estimate d, from d0)."""
    if opt.name == "prodigy":
        return f"prodigy, lr {opt.peak_lr:g} × d (d0 {opt.d0:g}, d_coef {opt.d_coef:g})"
    return f"adamw, lr {opt.peak_lr:g}, weight decay {opt.weight_decay:g}"


def announce(cfg: RecipeConfig, run: Run, models: Any, loaded: Sequence[str], state: LoopState, pipeline: str) -> None:
    """Print the start block: the model and its stored layers, devices, data, batch, steps, compile."""
    devices = {n: str(next(m.parameters()).device) for n in loaded if (m := getattr(models, n, None)) is not None}
    plan = RunPlan(
        pipeline=pipeline,
        model=str(run.model_dir),
        dtype=cfg.model.dtype,
        quantize=cfg.model.quantize,
        layers=count_layers(models.transformer, cfg.model.quantize),
        devices=devices,
        samples=run.samples,
        dataset=str(resolve_dataset_path(cfg.data.dataset_path)),
        buckets=cfg.data.buckets,
        micro_batch=cfg.data.batch_size,
        accumulation=cfg.train.gradient_accumulation_steps,
        ranks=run.world.size,
        steps=cfg.train.max_train_steps,
        start_step=state.step,
        compile_mode=run.compile_mode,
        output=run.output,
        adapter=adapter_text(cfg.model.lora),
        optimizer=optimizer_text(cfg.optimizer),
    )
    print(start_block(plan))


def prodigy_hparams(opt: OptimizerConfig) -> ProdigyHParams | None:
    """Prodigy's constants from the optimizer section (None with AdamW)."""
    if opt.name != "prodigy":
        return None
    return ProdigyHParams(opt.d0, opt.d_coef, opt.use_bias_correction, opt.safeguard_warmup)


def build_step(cfg: RecipeConfig, run: Run, loss_fn: LossFn, transformer: Any) -> StepFn:
    """The (optionally compiled) train step: gradients, clipping, AdamW or Prodigy, data-parallel reduction."""
    opt = cfg.optimizer
    hp = StepHParams(opt.betas, opt.eps, opt.weight_decay, cfg.train.max_grad_norm, grad_engine(run.compile_mode),
                     cfg.train.ema_decay, prodigy_hparams(opt))  # fmt: skip
    reduce = all_reduce_sum if run.world.size > 1 else None
    return make_train_step(loss_fn, hp, module=transformer, compile=run.compile_mode, reduce=reduce)


def step_taker(
    cfg: RecipeConfig,
    run: Run,
    step_fn: StepFn,
    stream: Iterator[Any],
    data: DataPath,
    ops: ModelOps,
    sched: Any,
    first: Callable[[Any], None] | None = None,
) -> Callable[[LoopState], LoopState]:
    """``take(state) → state``: one optimizer step over ``train.gradient_accumulation_steps`` micro-
    batches from ``stream``, their randomness keyed by (state.seed, step, micro-batch, sample);
    ``first`` sees the run's first micro-batch before its step (:func:`qflux.train_loop.report_unreached`)."""
    draws, k, tr, sch = (
        Draws.from_config(cfg.data, cfg.train),
        cfg.train.gradient_accumulation_steps,
        cfg.train,
        cfg.lr_scheduler,
    )
    seen: list[None] = []

    def take(state: LoopState) -> LoopState:
        micro, shares, samples, position = [], [], 0, state.position
        for m in range(k):
            position, raw = next(stream)
            cond = data.to_conditioning(raw)
            keys = (state.train.seed, state.step, m)
            micro.append(ops.to_batch(prepare(draws, sched, cond, data.empty, keys, run.device, raw["offset"])))
            # this rank's share of the micro-batch's global mean, over K accumulated micro-batches
            shares.append(cond.latents.shape[0] / raw["global_size"] / k)
            samples += raw["global_size"]  # over ranks: every rank walks the same global batches
        if first is not None and not seen:
            seen.append(first(micro[0]))
        lr = learning_rate(state.step, base_lr=cfg.optimizer.peak_lr, kind=sch.scheduler_type,
                           warmup_steps=sch.warmup_steps,
                           total_steps=tr.max_train_steps, num_cycles=sch.num_cycles)  # fmt: skip
        weights = torch.tensor(shares, device=run.device) if run.world.size > 1 else None
        train, metrics = step_fn(state.train, micro, torch.tensor(lr, dtype=torch.float64), weights)
        metrics = {**metrics, "samples": torch.tensor(float(samples), device=run.device)}
        return advance(state, train, metrics, position)

    return take
