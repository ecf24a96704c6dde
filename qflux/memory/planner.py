"""The ``plan`` command: will this run fit the card, and what is the cheapest change that makes it?

:func:`estimate` builds the configured transformer from its ``config.json`` (a local folder's, or
the published shapes qflux ships for the supported hub ids: :mod:`qflux.weights.shapes`), gives it the
run's storage, LoRA, checkpointing and block swap, and measures one real training step on fake
tensors (:mod:`qflux.memory.measure`). Encoders that stay resident (training without the cache, placed on
the transformer's device) add their stored weights; they run before the step, while the step's
activations do not exist, and their own forward is smaller than the step's at these sizes.

The alternatives vary storage (the configured dtype, fp8, nf4) × gradient checkpointing; each is
measured, then block swap is added where it is needed: the fewest blocks whose weights bring the
peak under the card, checked by measuring that run too. "Cheapest" orders changes by what they cost
a run: checkpointing (about a third more compute, exact), then fp8 storage (same speed, weights
rounded to 8 bits), then block swap (exact, slower by the copies), then 4 bits (with swap where 4 bits alone
do not fit).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from qflux.config.schema import LoraConfig
from qflux.diffusion.flow import MSE, Objective
from qflux.diffusion.routing import install_routing
from qflux.lora.adapter import inject_lora
from qflux.memory.measure import GIB, Breakdown, Fake4bit, fake_mode, measure_step, storage_bytes, to_fake
from qflux.optim.transform import OptimizerName, make_optimizer
from qflux.train.state import CompileMode, StepHParams, init_train_state, make_train_step, opt_tensors
from qflux.weights.block_swap import swap_blocks, swapped_bytes, transformer_blocks
from qflux.weights.loading import ModelFiles
from qflux.weights.quantize import fits_4bit, frozen_linears, quantize_frozen

CARDS = (12, 16, 24, 48, 80)
"""Card sizes (GiB) the documentation's table answers for."""
COST = {"cache": 0, "checkpointing": 1, "fp8": 2, "swap": 3, "nf4": 4, "fp4": 4}
"""How much each change costs a run (see the module docstring): lower is cheaper."""


@attrs.frozen
class Setting:
    """The memory-relevant choices of one run."""

    quantize: str
    """``model.quantize``: none (the model dtype), fp8, nf4 or fp4."""
    checkpointing: bool
    blocks_to_swap: int = 0
    cached: bool = True
    """``cache.use_cache``: the encoders are not loaded (False: they stay on the device)."""

    def overrides(self) -> dict[str, Any]:
        """The config keys that select this setting."""
        return {"model.quantize": self.quantize, "train.gradient_checkpointing": self.checkpointing,
                "train.blocks_to_swap": self.blocks_to_swap, "cache.use_cache": self.cached}  # fmt: skip

    def cost(self, base: Setting) -> tuple[int, ...]:
        """The changes from ``base``, each by its cost, most expensive first (compared as tuples)."""
        changes = [COST["cache"]] if self.cached and not base.cached else []
        if self.checkpointing and not base.checkpointing:
            changes.append(COST["checkpointing"])
        if self.quantize != base.quantize and self.quantize != "none":
            changes.append(COST[self.quantize])
        if self.blocks_to_swap > base.blocks_to_swap:
            changes.append(COST["swap"])
        return tuple(sorted(changes, reverse=True))


@attrs.frozen
class Inputs:
    """What a step holds besides the model: the shapes of its data."""

    batch_size: int
    accumulation: int
    target: tuple[int, int]
    """(w, h) of the target image (the bucket of ``data.max_pixels``)."""
    controls: tuple[tuple[int, int], ...]
    """(w, h) of each control image."""
    text_tokens: int
    """Tokens of the prompt embedding the transformer reads."""
    optimizer: OptimizerName = "adamw"
    """Whose state the step holds (Prodigy's is twice AdamW's)."""


@attrs.frozen(eq=False)
class PlanModel:
    """What the planner needs of a model; its package builds it (``plan_model()``)."""

    files: ModelFiles
    """The model's components (their classes build from a config)."""
    encoders: Sequence[str]
    """The components an uncached run keeps loaded beside the transformer."""
    batch: Callable[[Mapping[str, Mapping[str, Any]], Inputs, torch.dtype], Any]
    """(component configs, inputs, model dtype) → one micro-batch record of zeros."""
    loss: Callable[[nn.Module, Objective], Callable[..., torch.Tensor]]
    """The training loss of a transformer with an objective (the model's ``make_loss_fn``)."""
    vae_encode: Callable[[Any, torch.Tensor], torch.Tensor]
    """(VAE, images [B, 3, H, W]) → latents: the model's own encoding (the cache step's forward)."""
    objective: Objective = MSE
    """The run's objective (``train.loss``, ``train.preserve``: the base model's forward is planned)."""
    masked: bool = False
    """Whether the run's batches carry a change mask (``train.loss_mask``; ``train.preserve`` reads it)."""
    preserve_prompt: bool = False
    """Whether they carry a preserve prompt (``train.preserve_prompt``: two more forwards, one with backward)."""
    route: tuple[float, tuple[int, int]] | None = None
    """(``train.route_ratio``, ``train.route_blocks``) of a routed run (``train.route: tread``), or None."""

    def micro_batch(self, configs: Mapping[str, Mapping[str, Any]], inputs: Inputs, dtype: torch.dtype) -> Any:
        """``batch``'s record, with a change mask of zeros [B, 1, h, w] where the run has one (with
        ``train.preserve: base``, zero means every pixel is kept: the base model's forward runs)."""
        batch = self.batch(configs, inputs, dtype)
        if self.preserve_prompt:  # a prompt of the instruction's length
            batch = attrs.evolve(batch, preserve=batch.prompt())
        if self.route is not None:  # scores for the target's (h/2)·(w/2) tokens
            h, w = batch.latents.shape[-2:]
            batch = attrs.evolve(batch, route=torch.zeros((h // 2) * (w // 2)))
        if not self.masked:
            return batch
        b, _, h, w = batch.latents.shape
        return attrs.evolve(batch, change=torch.zeros(b, 1, h, w))

    def build(self, component: str, config: Mapping[str, Any], dtype: torch.dtype) -> nn.Module:
        """Component ``component`` from its config in ``dtype``, on the current default device (meta)."""
        cls = self.files.table()[component]
        if hasattr(cls, "config_class") and hasattr(cls.config_class, "from_dict"):  # transformers
            return cls(cls.config_class.from_dict(dict(config))).to(dtype)
        module = cls.from_config(dict(config))
        # diffusers warns that `.to(dtype)` may cast modules it would keep in fp32: planned as training casts
        quiet = logging.getLogger("diffusers.models.modeling_utils")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            return module.to(dtype)
        finally:
            quiet.setLevel(level)


@attrs.frozen
class Row:
    """One planned setting and its measured memory."""

    setting: Setting
    breakdown: Breakdown

    def fits(self, vram_gib: float) -> bool:
        return self.breakdown.peak <= vram_gib * GIB


def store_frozen(module: nn.Module, quantize: str) -> None:
    """Store ``module``'s frozen linears as training would (:func:`qflux.weights.quantize.quantize_frozen`),
    4-bit layers as :class:`qflux.memory.measure.Fake4bit` stand-ins, in place."""
    if quantize in ("none", "fp8"):
        quantize_frozen(module, quantize)
        return

    for name, m in frozen_linears(module):
        if fits_4bit(m.out_features, m.in_features):
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, Fake4bit.from_linear(m))


def encoder_bytes(model: PlanModel, component: str, config: Mapping[str, Any], dtype: torch.dtype,
                  quantize: str) -> int:  # fmt: skip
    """Bytes of an encoder's weights as stored (``quantize``: ``model.quantize_text_encoders``)."""
    module = _frozen_on_meta(model, component, config, dtype, quantize)
    return storage_bytes([*module.parameters(), *module.buffers()])


def _frozen_on_meta(model: PlanModel, component: str, config: Mapping[str, Any], dtype: torch.dtype,
                    quantize: str) -> nn.Module:  # fmt: skip
    """The component built on the meta device (no memory), frozen and stored as ``quantize`` says."""
    with torch.device("meta"):
        module = model.build(component, config, dtype)
    module.requires_grad_(False)
    store_frozen(module, quantize)
    return module


def estimate(model: PlanModel, configs: Mapping[str, Mapping[str, Any]], inputs: Inputs, setting: Setting, *,
             dtype: torch.dtype, lora: LoraConfig, resident_encoders: int = 0) -> Breakdown:  # fmt: skip
    """The peak device memory of one training step of ``setting`` (see :mod:`qflux.memory.measure`); the
    step is measured once per process for each setting (``setting.cached`` only changes what
    ``resident_encoders`` adds).

    Args:
        configs: {component: its config.json} (the transformer's, and what the batch reads).
        resident_encoders: bytes of the encoders loaded beside the transformer (uncached runs).
    """
    key = (model.files.pipeline, json.dumps(configs, sort_keys=True, default=str), inputs,
           attrs.evolve(setting, cached=True), str(dtype), attrs.astuple(lora), model.objective,
           model.masked, model.preserve_prompt, model.route)  # fmt: skip
    if key not in _MEASURED:
        _MEASURED[key] = _measure(model, configs, inputs, setting, dtype=dtype, lora=lora)
    step = _MEASURED[key]
    return step if setting.cached else attrs.evolve(step, weights=step.weights + resident_encoders)


_MEASURED: dict[tuple[Any, ...], Breakdown] = {}
"""Steps measured in this process (a plan measures each setting once; tests plan several times)."""


def _measure(model: PlanModel, configs: Mapping[str, Mapping[str, Any]], inputs: Inputs, setting: Setting, *,
             dtype: torch.dtype, lora: LoraConfig) -> Breakdown:  # fmt: skip
    """One step of ``setting`` measured on fake tensors (its transformer only)."""
    mode = fake_mode()
    transformer = _frozen_on_meta(model, "transformer", configs["transformer"], dtype, setting.quantize)
    if setting.checkpointing:
        transformer.enable_gradient_checkpointing()  # type: ignore[operator]
    names = list(inject_lora(transformer, lora, seed=0))
    if model.route is not None:  # routed as training routes it
        install_routing(transformer_blocks(transformer), model.route[1], model.route[0])
    to_fake(transformer, mode)
    swapped: list[torch.Tensor] = []
    if setting.blocks_to_swap:
        swapper = swap_blocks(transformer, setting.blocks_to_swap, torch.device("cpu"))
        swapped = swapper.host_tensors()
    held = {t.untyped_storage()._cdata for t in swapped}
    module = [t for t in (*transformer.parameters(), *transformer.buffers()) if t.untyped_storage()._cdata not in held]
    params = dict(transformer.named_parameters())
    optimizer = make_optimizer(inputs.optimizer)
    with mode:
        state = init_train_state({k: params[k].detach().float() for k in names}, seed=0, optimizer=optimizer)
    opt = opt_tensors(state.opt)
    adapter = [params[k] for k in names]
    weights = storage_bytes(module) - storage_bytes(adapter)
    step = make_train_step(
        model.loss(transformer, model.objective), StepHParams(optimizer, engine="autograd"), module=transformer
    )

    def run() -> None:
        # all K micro-batches are prepared before the step (as step_taker does); one is enough to
        # run through it: the others repeat the same forward and backward one after the other
        batches = [model.micro_batch(configs, inputs, dtype) for _ in range(inputs.accumulation)]
        step(state, batches[:1], torch.tensor(1e-4, dtype=torch.float64))

    activations, transient = measure_step(run, [*module, *state.lora.values(), *opt], mode)
    lora_bytes = storage_bytes(state.lora.values())
    return Breakdown(
        weights=weights,
        state=storage_bytes([*adapter, *state.lora.values(), *opt]),
        activations=activations,
        # with K > 1 the summed gradient (fp32, the LoRA's size) lives through the later micro-batches
        transient=transient + (lora_bytes if inputs.accumulation > 1 else 0),
    )


def real_step(
    model: PlanModel,
    transformer: nn.Module,
    configs: Mapping[str, Mapping[str, Any]],
    inputs: Inputs,
    setting: Setting,
    *,
    lora: LoraConfig,
    device: torch.device,
    compile_mode: CompileMode = "none",
) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """The step :func:`estimate` plans, on a real ``transformer`` (frozen, in the model dtype; on the
    host when swapping blocks), set up on ``device`` as training sets it up: (one step, the tensors
    resident on ``device``: frozen weights, LoRA and optimizer state). What tests and
    benchmarks/memory.py measure the plan against.

    Args:
        configs: {component: config.json}, as for :func:`estimate`.
        compile_mode: ``regional`` compiles the repeated blocks (as ``train.compile: regional``).
    """
    dtype = next(transformer.parameters()).dtype
    transformer.requires_grad_(False)
    quantize_frozen(transformer, setting.quantize)
    if setting.checkpointing:
        transformer.enable_gradient_checkpointing()  # type: ignore[operator]
    lora0 = inject_lora(transformer, lora, seed=0)
    if model.route is not None:  # routed as training routes it
        install_routing(transformer_blocks(transformer), model.route[1], model.route[0])
    held: set[int] = set()
    if setting.blocks_to_swap:
        swapper = swap_blocks(transformer, setting.blocks_to_swap, device)
        held = {t.untyped_storage()._cdata for t in swapper.host_tensors()}
    else:
        transformer.to(device)
    optimizer = make_optimizer(inputs.optimizer)
    state = init_train_state({k: v.to(device) for k, v in lora0.items()}, seed=0, optimizer=optimizer)
    loss = model.loss(transformer, model.objective)
    step = make_train_step(loss, StepHParams(optimizer, engine="autograd"), module=transformer, compile=compile_mode)

    def run() -> None:
        with torch.device(device):
            batch = model.micro_batch(configs, inputs, dtype)
        step(state, [batch], torch.tensor(1e-4, dtype=torch.float64))

    opt = opt_tensors(state.opt)
    frozen = [t for t in (*transformer.parameters(), *transformer.buffers()) if t.untyped_storage()._cdata not in held]
    return run, [*frozen, *state.lora.values(), *opt]


def block_weights(model: PlanModel, config: Mapping[str, Any], dtype: torch.dtype, quantize: str) -> list[int]:
    """Bytes of each transformer block's frozen linear weights as stored, in forward order."""
    with torch.device("meta"):
        transformer = model.build("transformer", config, dtype)
    transformer.requires_grad_(False)
    store_frozen(transformer, quantize)
    return [swapped_bytes([b]) for b in transformer_blocks(transformer)]


def blocks_needed(row: Row, blocks: Sequence[int], vram_gib: float) -> int | None:
    """The fewest blocks to swap (the last ones) for ``row`` to fit, counting two blocks in flight;
    None when even all of them are not enough."""
    excess = row.breakdown.peak - vram_gib * GIB
    if excess <= 0:
        return 0
    for n in range(1, len(blocks) + 1):
        in_flight = sum(sorted(blocks[-n:])[-2:])
        if sum(blocks[-n:]) - in_flight >= excess:
            return n
    return None


def plan_rows(
    model: PlanModel,
    configs: Mapping[str, Mapping[str, Any]],
    inputs: Inputs,
    configured: Setting,
    *,
    vram_gib: float,
    dtype: torch.dtype,
    lora: LoraConfig,
    encoders: Mapping[str, int],
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[Row, list[Row]]:
    """The configured run's row and the alternatives' rows (each step measured), cheapest first.

    Args:
        encoders: {``model.quantize``: bytes of the encoders an uncached run keeps on the device
            with that storage} (empty when the run is cached or they sit elsewhere).
    """

    def row(s: Setting) -> Row:
        progress(f"measuring: {s.quantize}, checkpointing {'on' if s.checkpointing else 'off'}, "
                 f"{s.blocks_to_swap} blocks swapped")  # fmt: skip
        extra = encoders.get(s.quantize, 0)
        return Row(s, estimate(model, configs, inputs, s, dtype=dtype, lora=lora, resident_encoders=extra))

    caching = [configured.cached] + ([True] if not configured.cached and any(encoders.values()) else [])
    rows = {configured: row(configured)}
    for quantize in ("none", "fp8", "nf4"):
        for ckpt in (False, True):
            for cached in caching:
                s = Setting(quantize, ckpt, 0, cached)
                if s not in rows:
                    rows[s] = row(s)
    for s, r in list(rows.items()):
        # DoRA reads each layer's whole weight every step: not with block swap (qflux.train.run refuses it)
        if r.fits(vram_gib) or s.blocks_to_swap or lora.kind == "dora":
            continue
        n = blocks_needed(r, block_weights(model, configs["transformer"], dtype, s.quantize), vram_gib)
        if n:
            swapped = attrs.evolve(s, blocks_to_swap=n)
            rows[swapped] = row(swapped)
    alternatives = sorted((r for s, r in rows.items() if s != configured), key=lambda r: r.setting.cost(configured))
    return rows[configured], alternatives


def cheapest_fit(alternatives: Sequence[Row], configured: Setting, vram_gib: float) -> Row | None:
    """The alternative that fits with the cheapest change (then the lowest peak)."""
    fitting = [r for r in alternatives if r.fits(vram_gib)]
    return min(fitting, key=lambda r: (r.setting.cost(configured), r.breakdown.peak), default=None)


def change_text(row: Row, configured: Setting) -> str:
    """The overrides that turn ``configured`` into ``row``'s setting."""
    ours, theirs = configured.overrides(), row.setting.overrides()
    return " ".join(f"--{k}={str(v).lower()}" for k, v in theirs.items() if ours[k] != v)


def table(configured: Row, alternatives: Sequence[Row], vram_gib: float) -> str:
    """The configured run's breakdown, then one line per alternative."""
    b = configured.breakdown
    lines = [
        f"  frozen weights      {b.weights / GIB:8.2f} GiB  (as stored; swapped blocks excepted)",
        f"  LoRA + optimizer    {b.state / GIB:8.2f} GiB",
        f"  activations         {b.activations / GIB:8.2f} GiB  (kept for backward)",
        f"  largest transient   {b.transient / GIB:8.2f} GiB",
        f"  CUDA allowance      {b.allowance / GIB:8.2f} GiB  (context, workspaces, allocator)",
        f"  peak                {b.peak / GIB:8.2f} GiB  → {'fits' if configured.fits(vram_gib) else 'does not fit'} "
        f"{vram_gib:g} GiB",
        "",
        f"  {'quantize':<9} {'checkpointing':<14} {'swap':>4}  {'cache':<6} {'peak GiB':>9}  fits {vram_gib:g} GiB",
    ]
    for r in [configured, *alternatives]:
        s = r.setting
        mark = " (configured)" if r is configured else ""
        lines.append(f"  {s.quantize:<9} {'on' if s.checkpointing else 'off':<14} {s.blocks_to_swap:>4}  "
                     f"{'on' if s.cached else 'off':<6} {r.breakdown.peak / GIB:>9.2f}  "
                     f"{'yes' if r.fits(vram_gib) else 'no'}{mark}")  # fmt: skip
    return "\n".join(lines)
