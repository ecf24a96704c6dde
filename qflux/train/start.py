"""What a training run builds before its first step: the adapter on the transformer, the first state (fresh
or a checkpoint's), the start block, the step function and the step taker that feeds it micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch

from qflux.config.errors import QfluxError
from qflux.config.parse import to_dict
from qflux.config.schema import LoraConfig, OptimizerConfig, RecipeConfig
from qflux.diffusion.routing import install_routing
from qflux.lora.adapter import inject_lora, lora_from_file
from qflux.lora.formats import Naming, check_convertible
from qflux.lora.kinds import every_linear, module_of
from qflux.optim.schedules import learning_rate
from qflux.optim.transform import optimizer_from_config
from qflux.train.batch import DataPath, Draws, prepare
from qflux.train.builtin import resolve_dataset_path
from qflux.train.checkpoint import (
    incompatibilities,
    load_checkpoint,
    load_loop_state,
)
from qflux.train.distributed import all_reduce_sum, shard_frozen_base
from qflux.train.loop import LoopState, advance, start_state
from qflux.train.run import ModelOps, Run
from qflux.train.state import (
    LossFn,
    StepFn,
    StepHParams,
    grad_engine,
    init_train_state,
    make_train_step,
)
from qflux.train.summary import RunStart, size_text, start_block
from qflux.weights.block_swap import swap_blocks, swapped_bytes, transformer_blocks
from qflux.weights.frozen_linear import prepare_frozen_base
from qflux.weights.quantize import count_layers

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
    if cfg.train.route == "tread" and cfg.train.route_ratio > 0:
        install_routing(transformer_blocks(transformer), cfg.train.route_blocks, cfg.train.route_ratio)
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
    optimizer = optimizer_from_config(cfg.optimizer, cfg.train.max_grad_norm)
    fresh = init_train_state({k: v.to(run.device) for k, v in lora0.items()}, cfg.seed, ema=averaged,
                             optimizer=optimizer)  # fmt: skip
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


def adapter_text(lora: LoraConfig, tensors: Mapping[str, torch.Tensor]) -> str:
    """The start block's adapter line: kind, rank, alpha, the targets, and how many layers and trainable
    parameters they came to (``tensors``: the adapter's tensors by module parameter name)."""
    targets = "every linear layer" if every_linear(lora) else ", ".join(lora.target_modules)
    layers = len({module_of(name) for name in tensors})
    params = sum(t.numel() for t in tensors.values())
    return (
        f"{lora.kind}, rank {lora.r}, alpha {lora.lora_alpha:g}, on {targets}: {layers} layers, {params:,} parameters"
    )


def optimizer_text(opt: OptimizerConfig) -> str:
    """The start block's optimizer line (Prodigy: lr multiplies its estimate d, from d0)."""
    if opt.name == "prodigy":
        return f"prodigy, lr {opt.peak_lr:g} × d (d0 {opt.d0:g}, d_coef {opt.d_coef:g})"
    return f"adamw, lr {opt.peak_lr:g}, weight decay {opt.weight_decay:g}"


def announce(cfg: RecipeConfig, run: Run, models: Any, loaded: Sequence[str], state: LoopState, pipeline: str) -> None:
    """Print the start block: the model and its stored layers, devices, data, batch, steps, compile."""
    devices = {n: str(next(m.parameters()).device) for n in loaded if (m := getattr(models, n, None)) is not None}
    plan = RunStart(
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
        adapter=adapter_text(cfg.model.lora, state.train.lora),
        optimizer=optimizer_text(cfg.optimizer),
    )
    print(start_block(plan))


def build_step(cfg: RecipeConfig, run: Run, loss_fn: LossFn, transformer: Any) -> StepFn:
    """The (optionally compiled) train step: gradients, clipping, AdamW or Prodigy, data-parallel reduction."""
    optimizer = optimizer_from_config(cfg.optimizer, cfg.train.max_grad_norm)
    hp = StepHParams(optimizer, grad_engine(run.compile_mode), cfg.train.ema_decay)
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
    ``first`` sees the run's first micro-batch before its step (:func:`qflux.train.driver.report_unreached`)."""
    draws, k, tr, sch = (
        Draws.from_config(cfg.data, cfg.train, ops.mu),
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
            micro.append(ops.to_batch(prepare(draws, sched, cond, data.empty, keys, run.device, raw["offset"],
                                              data.preserve)))  # fmt: skip
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
