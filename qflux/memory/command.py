"""``python -m recipes.<model>_lora plan [--config=F] [--section.key=value ...] --vram=GiB [--json]``:
the configured run's peak device memory and its alternatives (:mod:`qflux.memory.planner`), from the model's
``config.json`` files alone; exit 0 when the run fits, :data:`DOES_NOT_FIT` when it does not. :func:`recipe_main` is
a recipe's whole command line: its own train, cache and predict, with the plan and check every family shares."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.config.cli import main as cli_main
from qflux.config.errors import QfluxError
from qflux.config.schema import RecipeConfig
from qflux.data.pairs import PairRule
from qflux.diffusion.latents import size_multiple
from qflux.memory.encode import EncodeStep, encode_step
from qflux.memory.measure import GIB
from qflux.memory.planner import (
    Inputs,
    PlanModel,
    Row,
    Setting,
    change_text,
    cheapest_fit,
    encoder_bytes,
    estimate,
    plan_rows,
    table,
)
from qflux.train.check import run_check
from qflux.train.family import Family
from qflux.train.run import family_folder
from qflux.weights.dtypes import torch_dtype
from qflux.weights.loading import component_config, stored_bytes
from qflux.weights.shapes import published, shipped_ids

Configs = Mapping[str, Mapping[str, Any]]
"""{component: its config.json}."""
DOES_NOT_FIT = 3
"""Exit status of ``plan`` when the configured run does not fit."""
DEFAULT_AREA = 1024 * 1024
"""The area planned for when ``data.max_pixels`` is null (the buckets then take the largest image's)."""
ON_DEVICE = ("auto", "cuda", "cuda:0")
"""Device settings that mean the first CUDA device on a GPU machine."""


@attrs.frozen(eq=False)
class PlanTarget:
    """A recipe's model for ``plan``: its planner record and how to read its shapes."""

    model: PlanModel
    pipeline: str
    components: Sequence[str]
    """The components whose config.json the plan reads."""
    controls: int
    """Control images per sample planned for (the most the model takes)."""
    text_tokens: Callable[[Mapping[str, Mapping[str, Any]], int], int]
    """(configs, controls) → tokens of the prompt embedding."""
    control_pixels: int | None = None
    """The run's cap on a control image's area (``data.control_size`` under the model's rule and
    ``data.control_max_pixels``: :meth:`qflux.data.controls.ControlRule.resolve`); None: the target's."""


def model_configs(name: str, target: PlanTarget, folder: Callable[[], Path]) -> tuple[dict[str, dict[str, Any]], str]:
    """{component: config.json} and where they came from: qflux's shipped shapes for a supported hub
    id (nothing downloaded), otherwise the model folder (``folder()``: local, built-in or hub cache)."""
    shipped = published(name)
    if shipped is not None:
        missing = [c for c in target.components if c not in shipped]
        if missing:
            raise QfluxError(f"qflux's shapes of '{name}' lack {', '.join(missing)}")
        return {c: shipped[c] for c in target.components}, f"{name} (published shapes shipped with qflux)"
    try:
        path = folder()
    except QfluxError as e:
        raise QfluxError(
            f"{e}\nplan reads only config.json files; qflux ships those of {', '.join(shipped_ids())}. For another "
            "model, set model.pretrained_model_name_or_path to a local folder with its components' config.json"
        ) from e
    return {c: component_config(path, c) for c in target.components}, str(path)


def same_device(setting: str, transformer: str) -> bool:
    """Whether a component placed at ``setting`` shares the transformer's device."""
    return setting == transformer or (setting in ON_DEVICE and transformer in ON_DEVICE)


def resident_encoders(cfg: RecipeConfig, target: PlanTarget, configs: Configs) -> dict[str, int]:
    """{storage: bytes of the encoders an uncached run keeps on the transformer's device} for each
    ``model.quantize`` a row may use (the text encoders follow it with ``quantize_text_encoders``)."""
    if cfg.cache.use_cache:
        return {}
    devices = attrs.asdict(cfg.devices)
    resident = [c for c in target.model.encoders if same_device(devices[c], cfg.devices.transformer)]
    dtype = torch_dtype(cfg.model.dtype)
    out = {}
    for quantize in ("none", "fp8", "nf4", "fp4"):
        text = quantize if cfg.model.quantize_text_encoders else "none"
        out[quantize] = sum(
            encoder_bytes(target.model, c, configs[c], dtype, text if c.startswith("text_encoder") else "none")
            for c in resident
        )
    return out


def cache_step(cfg: RecipeConfig, target: PlanTarget, configs: Configs, inputs: Inputs) -> EncodeStep:
    """The cache step's peak (:mod:`qflux.memory.encode`): the encoders placed on the transformer's device, the text
    encoders stored as ``model.quantize_text_encoders`` says, one prompt of the run's tokens, one target image."""
    devices = attrs.asdict(cfg.devices)
    on_card = [c for c in target.model.encoders if same_device(devices[c], cfg.devices.transformer)]
    text = cfg.model.quantize if cfg.model.quantize_text_encoders else "none"
    return encode_step(target.model, configs, on_card, dtype=torch_dtype(cfg.model.dtype), text_quantize=text,
                       text_tokens=inputs.text_tokens, image=inputs.target)  # fmt: skip


def plan_inputs(cfg: RecipeConfig, target: PlanTarget, configs: Configs, controls: int) -> Inputs:
    """The shapes the run's step holds: the 1:1 bucket of ``data.max_pixels`` for the target and each
    control image (of the control cap when smaller), the batch, the accumulation and the prompt's tokens."""
    area, multiple = cfg.data.max_pixels or DEFAULT_AREA, size_multiple(configs["vae"])
    size = square_bucket(area, multiple)
    control = square_bucket(min(area, target.control_pixels or area), multiple)
    return Inputs(
        batch_size=cfg.data.batch_size,
        accumulation=cfg.train.gradient_accumulation_steps,
        target=size,
        controls=(control,) * controls,
        text_tokens=target.text_tokens(configs, controls),
        optimizer=cfg.optimizer.name,
    )


def run_plan(
    cfg: RecipeConfig,
    target: PlanTarget,
    folder: Callable[[], Path],
    *,
    vram: float | None,
    as_json_output: bool,
    controls: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Print the plan (a table, or JSON) and return the exit status (0 fits, :data:`DOES_NOT_FIT`)."""
    vram_gib = vram if vram is not None else _device_gib()
    configs, source = model_configs(cfg.model.pretrained_model_name_or_path, target, folder)
    n = target.controls if controls is None else controls
    inputs = plan_inputs(cfg, target, configs, n)
    train = cfg.train
    file = cfg.model.transformer_file
    stored = stored_bytes(file) if file is not None and Path(file).is_file() else None
    # a diffusers-named fp8 file stays fp8 whatever model.quantize says (qflux.weights.loading.single_file)
    quantize = "fp8" if stored is not None and stored[1].startswith("F8_E4M3") else cfg.model.quantize
    configured = Setting(quantize, train.gradient_checkpointing, train.blocks_to_swap, cfg.cache.use_cache)
    say = progress or (lambda m: print(m, file=sys.stderr))
    first, alternatives = plan_rows(target.model, configs, inputs, configured, vram_gib=vram_gib,
                                    dtype=torch_dtype(cfg.model.dtype), lora=cfg.model.lora,
                                    encoders=resident_encoders(cfg, target, configs), progress=say)  # fmt: skip
    cheapest = None if first.fits(vram_gib) else cheapest_fit(alternatives, configured, vram_gib)
    encoding = cache_step(cfg, target, configs, inputs)
    if as_json_output:
        out = {**as_json(first, alternatives, vram_gib, cheapest), "cache_step": encoding.as_json(vram_gib)}
        if stored is not None:
            out["transformer_file"] = {"bytes": stored[0], "gib": round(stored[0] / GIB, 3), "stored_as": stored[1]}
        print(json.dumps(out, indent=2))
    else:
        print(_header(cfg, target, source, inputs))
        if stored is not None:
            how = "fp8, as it stays" if quantize != cfg.model.quantize else "as model.quantize stores it"
            print(f"  file     model.transformer_file {stored[0] / GIB:.2f} GiB stored ({stored[1]}); planned {how}")
        print(table(first, alternatives, vram_gib))
        print(encoding.text(vram_gib))
        print(_verdict(first, cheapest, configured, vram_gib))
    return 0 if first.fits(vram_gib) else DOES_NOT_FIT


def warn_if_too_big(cfg: RecipeConfig, target: PlanTarget, run: Any) -> None:
    """Print :func:`fit_warning` (rank 0 of a CUDA run)."""
    if run.device.type == "cuda" and run.world.is_main:
        warning = fit_warning(cfg, target, run.model_dir, run.device)
        if warning is not None:
            print(warning)


def fit_warning(cfg: RecipeConfig, target: PlanTarget, model_dir: Path, device: torch.device) -> str | None:
    """Before a CUDA run loads anything: the configured step's planned peak against the device's
    free memory; a warning naming the ``plan`` command when it will not fit, else None."""
    if device.type != "cuda":
        return None
    configs, _ = model_configs(str(model_dir), target, lambda: model_dir)
    train = cfg.train
    setting = Setting(cfg.model.quantize, train.gradient_checkpointing, train.blocks_to_swap, cfg.cache.use_cache)
    row = plan_rows_configured(cfg, target, configs, setting)
    free, _ = torch.cuda.mem_get_info(device)
    return too_big(row.breakdown.peak, free)


def too_big(peak: int, free: int) -> str | None:
    """The warning for a planned ``peak`` above ``free`` bytes, or None."""
    if peak <= free:
        return None
    return (
        f"warning: this run is planned to need {peak / GIB:.1f} GiB at its peak and the device has {free / GIB:.1f} "
        "GiB free: it will likely run out of memory. The plan command (same options, --vram=GiB) lists changes that fit"
    )


def plan_rows_configured(cfg: RecipeConfig, target: PlanTarget, configs: Configs, setting: Setting) -> Row:
    """The configured run's row alone (no alternatives)."""
    inputs = plan_inputs(cfg, target, configs, target.controls)
    extra = resident_encoders(cfg, target, configs).get(setting.quantize, 0)
    breakdown = estimate(target.model, configs, inputs, setting, dtype=torch_dtype(cfg.model.dtype),
                         lora=cfg.model.lora, resident_encoders=extra)  # fmt: skip
    return Row(setting, breakdown)


def _device_gib() -> float:
    if not torch.cuda.is_available():
        raise QfluxError("plan needs --vram=GiB (the card's memory): this machine has no CUDA device to read it from")
    return torch.cuda.get_device_properties(0).total_memory / GIB


def _header(cfg: RecipeConfig, target: PlanTarget, source: str, inputs: Inputs) -> str:
    (w, h), n = inputs.target, len(inputs.controls)
    cw, ch = inputs.controls[0] if inputs.controls else (w, h)
    cached = "from the cache (encoders not loaded)" if cfg.cache.use_cache else "uncached (encoders loaded)"
    return (
        f"{target.pipeline} LoRA training, planned on fake tensors (nothing loaded, no GPU needed)\n"
        f"  shapes   {source}\n"
        f"  step     {w}×{h} target + {n} control image(s) of {cw}×{ch}, {inputs.text_tokens} text tokens, "
        f"batch {inputs.batch_size} × {inputs.accumulation} accumulated, {cfg.model.dtype}, LoRA rank "
        f"{cfg.model.lora.r}, {cached}"
    )


def _verdict(first: Row, cheapest: Row | None, configured: Setting, vram_gib: float) -> str:
    if first.fits(vram_gib):
        return f"\nfits: {first.breakdown.peak / GIB:.2f} of {vram_gib:g} GiB"
    if cheapest is None:
        return f"\ndoes not fit {vram_gib:g} GiB, nor does any alternative: lower data.max_pixels or data.batch_size"
    return (
        f"\ndoes not fit {vram_gib:g} GiB; the cheapest change that fits ({cheapest.breakdown.peak / GIB:.2f} GiB): "
        f"{change_text(cheapest, configured)}"
    )


def recipe_main(family: Family, *, train: Callable[[Any], Any], cache: Callable[[Any], Any],
                predict: Callable[..., Any], rule: Callable[[Any], PairRule], target: Callable[[Any], PlanTarget],
                argv: list[str] | None) -> None:  # fmt: skip
    """Run ``python -m recipes.<family>_lora``: the recipe's ``train``, ``cache`` and ``predict``, and the
    ``plan`` and ``check`` of the family's model folder, its pairs (``rule(cfg)``) and its planner
    record (``target(cfg)``); no arguments trains the built-in default; errors print one message and exit 2."""

    def plan(cfg: RecipeConfig, *, vram: float | None, as_json: bool = False, controls: int | None = None) -> int:
        """Print the run's peak GPU memory and its alternatives, planned on fake tensors; returns the
        exit status (0: fits in ``vram`` GiB; 3: does not)."""
        return run_plan(cfg, target(cfg), partial(family_folder, cfg, family), vram=vram, as_json_output=as_json,
                        controls=controls)  # fmt: skip

    def check(cfg: RecipeConfig) -> int:
        """Check the dataset: its errors (exit 2, as train gives them), then a warning per pair that will
        likely train badly (a target moved or re-framed against its control, identical to it, of another
        aspect; a too-short instruction); exit 0 when there are only warnings."""
        return run_check(cfg, rule(cfg), partial(family_folder, cfg, family))

    cli_main(f"{family.name}_lora", family.pipeline, family.config, train=train, cache=cache, predict=predict,
             plan=plan, check=check, argv=argv)  # fmt: skip


def as_json(configured: Row, alternatives: Sequence[Row], vram_gib: float, cheapest: Row | None) -> dict[str, Any]:
    """``{"peak_gib", "fits", "breakdown", "alternatives", "cheapest_change"}``."""

    def row(r: Row) -> dict[str, Any]:
        return {**r.setting.overrides(), "peak_gib": round(r.breakdown.peak / GIB, 3), "fits": r.fits(vram_gib)}

    return {
        "peak_gib": round(configured.breakdown.peak / GIB, 3),
        "fits": configured.fits(vram_gib),
        "vram_gib": vram_gib,
        "breakdown": configured.breakdown.as_gib(),
        "alternatives": [row(r) for r in alternatives],
        "cheapest_change": None if cheapest is None else change_text(cheapest, configured.setting),
    }


def square_bucket(max_pixels: int, multiple: int) -> tuple[int, int]:
    """The 1:1 bucket of ``data.max_pixels`` (every bucket holds about that area)."""
    side = max(multiple, math.isqrt(max_pixels) // multiple * multiple)
    return side, side
