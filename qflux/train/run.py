"""What every LoRA recipe's training run does around its model: the run's setting (device, ranks, model folder,
data, resume point); then :mod:`qflux.train.start` (the adapter, the first state, the step) and
:mod:`qflux.train.driver` (the loop with its hooks, and the outputs). The recipes call these by name, in order;
what differs between models (loading, conditioning, the loss, previews) is theirs.

    with training_run(cfg, FAMILY, rule) as run:  # device, ranks, model folder, data, resume point
        models, data = _inputs(cfg, run)            # memory check; the encoders, or the cache
        return train_lora(cfg, run, FAMILY, models, data, _ops(cfg, run, models))  # adapter, loop, outputs
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

from qflux.config.devices import component_devices, resolve_device
from qflux.config.errors import QfluxError
from qflux.config.schema import RecipeConfig
from qflux.data.checks import check_pairs
from qflux.data.dataset import PairDataset
from qflux.data.order import check_batches
from qflux.data.pairs import Listing, PairRule, PairSample, scan_pairs
from qflux.diffusion.latents import size_multiple, vae_scale_factor
from qflux.diffusion.routing import routed_blocks
from qflux.lora.adapter import LORA_WEIGHT_NAME
from qflux.lora.formats import Naming
from qflux.train.batch import Conditioning, Prepared
from qflux.train.builtin import resolve_dataset_path, resolve_model_path
from qflux.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_partial,
)
from qflux.train.distributed import World, init_world, rank_device
from qflux.train.family import Family
from qflux.train.run_dir import claim_output_dir
from qflux.train.state import (
    CompileMode,
    TrainState,
    resolve_compile,
)
from qflux.train.validation import ValidationSet, validation_set
from qflux.weights.block_swap import block_count, swap_problem
from qflux.weights.folders import resolve_model_dir
from qflux.weights.fp8 import check_fp8_device
from qflux.weights.loading import component_config


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
    make_loss: Callable[[Any], Any]
    """``make_loss(transformer) → loss_fn(lora, batch)``: the training objective on the adapted transformer."""
    mu: Callable[[int], float] | None = None
    """The pipeline's shift μ for an image of that many tokens (``train.timestep_sampling: resolution_shift``),
    where it is not the scheduler config's linear μ (FLUX.2's empirical one); None: that one."""


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


def family_folder(cfg: RecipeConfig, family: Family) -> Path:
    """The family's resolved model folder for ``cfg`` (of ``model.variant`` where its config has one)."""
    variant = getattr(cfg.model, "variant", None)
    return model_folder(cfg.model.pretrained_model_name_or_path, variant, family.components, family.pipeline)


def pair_dataset(cfg: RecipeConfig, path: Path) -> Callable[[Sequence[PairSample]], PairDataset]:
    """The uncached runs' dataset over samples, with the change masks ``train.loss_mask`` asks for
    on the latent grid of the model in ``path``."""
    factor = vae_scale_factor(component_config(path, "vae"))
    return partial(PairDataset, mask_mode=cfg.train.loss_mask, vae_factor=factor)


def image_multiple(path: Path) -> int:
    """What image sides are multiples of for the model in ``path``: its VAE factor × 2 (read from
    the VAE's config, :func:`qflux.diffusion.latents.size_multiple`)."""
    return size_multiple(component_config(path, "vae"))


def dataset_samples(cfg: RecipeConfig, path: Path, rule: PairRule, listing: Listing | None = None) -> list[PairSample]:
    """The checked dataset, sized for the model in ``path`` (before any model loads)."""
    return samples_at(cfg, image_multiple(path), rule, listing)


def samples_at(cfg: RecipeConfig, multiple: int, rule: PairRule, listing: Listing | None = None) -> list[PairSample]:
    """The checked dataset with image sides multiples of ``multiple``: in aspect-ratio buckets
    (``data.buckets: auto``) or each image at its own size (``exact``); ``listing`` receives the whole
    list behind each grouped warning."""
    return scan_pairs(
        resolve_dataset_path(cfg.data.dataset_path),
        cfg.data.max_pixels,
        multiple=multiple,
        skip_invalid=cfg.data.skip_invalid,
        warn=tqdm.write,
        listing=listing,
        controls=rule.controls,
        buckets=cfg.data.buckets,
        control=rule.control.resolve(cfg.data),
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
    (before any model loads) where it cannot run; block swap and the routed blocks are checked here too."""
    swap, dora = cfg.train.blocks_to_swap, cfg.model.lora.kind == "dora"
    eager = (swap or dora) and cfg.train.compile == "auto"
    mode = "none" if eager else resolve_compile(cfg.train.compile, device)
    if dora and mode != "none":
        raise QfluxError(
            f"train.compile: {cfg.train.compile} cannot trace peft's DoRA layers (their weight lookup breaks the "
            "graph); use train.compile: auto or false with model.lora.kind: dora"
        )
    blocks = block_count(component_config(path, "transformer"))
    if cfg.train.route == "tread":
        try:
            routed_blocks(cfg.train.route_blocks, blocks)
        except ValueError as e:
            raise QfluxError(str(e)) from None
    problem = swap_problem(swap, blocks=blocks,
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
        QfluxError: DoRA with a ComfyUI file or with block swap; on a GGUF transformer, another adapter kind than
            lora, or block swap.
    """
    gguf = cfg.model.transformer_file is not None and cfg.model.transformer_file.lower().endswith(".gguf")
    if gguf and cfg.model.lora.kind != "lora":
        raise QfluxError(
            f"model.lora.kind: {cfg.model.lora.kind} reads each adapted layer's weight, which a GGUF transformer keeps "
            "quantized (model.transformer_file); set model.lora.kind: lora, or give a .safetensors transformer_file"
        )
    if gguf and cfg.train.blocks_to_swap:
        raise QfluxError(
            "train.blocks_to_swap cannot move a GGUF transformer's quantized layers (model.transformer_file); set "
            "train.blocks_to_swap: 0, or give a .safetensors transformer_file"
        )
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
def training_run(cfg: RecipeConfig, family: Family, rule: PairRule) -> Iterator[Run]:
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
        path = family_folder(cfg, family)
        listed: list[tuple[str, Sequence[str]]] = []
        samples = dataset_samples(cfg, path, rule, lambda cause, names: listed.append((cause, names)))
        if world.is_main:  # the warnings are printed by rank 0 alone: the others need not decode the pairs
            for line in check_pairs(samples, progress=partial(tqdm, desc="checking pairs", unit="pair", leave=False)):
                print(line)
        check_batches(samples, cfg.data.batch_size, world.size, drop_last=cfg.data.drop_last)
        mode = _compile_mode(cfg, device, world, path)
        held = None
        if cfg.validation.enabled:
            held = validation_set(cfg.validation, cfg.data, multiple=image_multiple(path), rule=rule)
        out = Path(cfg.output_dir)
        resume_from = _checkpoint_to_resume(cfg)
        finished = _finished(cfg, resume_from) if resume_from is not None else None
        if finished is None and world.is_main:
            _prepare_output(cfg, out, fresh=resume_from is None)
            _write_listing(out, listed)
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


DATA_WARNINGS = "data_warnings.txt"
"""The whole list behind each grouped dataset warning, in the run's folder."""


def _write_listing(out: Path, listed: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Write :data:`DATA_WARNINGS` (every name behind each grouped warning) and say where it is."""
    if listed:
        text = "".join(f"{cause}:\n" + "".join(f"  {n}\n" for n in names) for cause, names in listed)
        out.mkdir(parents=True, exist_ok=True)
        (out / DATA_WARNINGS).write_text(text, encoding="utf-8")
        print(f"the dataset warnings' full lists: {out / DATA_WARNINGS}")


def _prepare_output(cfg: RecipeConfig, out: Path, *, fresh: bool) -> None:
    """A fresh run claims the folder (:func:`qflux.train.run_dir.claim_output_dir`); every run clears the
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
