"""The memory plan: the fake-tensor estimate of a step against the same step measured on the CPU by
torch's profiler (tiny models: fp32, bf16 with checkpointing, fp8 storage, block swap, Qwen with
two controls), the 4-bit stand-in against bitsandbytes' own storage, and the warning text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from qflux.config.schema import LoraConfig
from qflux.memory.command import too_big
from qflux.memory.measure import Fake4bit, LiveBytes, profiled_peak, storage_bytes
from qflux.memory.planner import Inputs, PlanModel, Setting, estimate, real_step, store_frozen
from qflux.weights.loading import component_config
from qflux.weights.quantize import quantize_frozen, weight_bytes


def _real_step(model: PlanModel, path: Path, inputs: Inputs, setting: Setting, dtype: torch.dtype,
               lora: LoraConfig | None = None) -> tuple[int, int, int]:  # fmt: skip
    """The real model's step on the CPU, set up as planned: (resident bytes, the peak of what it
    allocates by :class:`LiveBytes` on real tensors, the same by torch's profiler)."""
    cls = model.files.table()["transformer"]
    transformer = cls.from_pretrained(path, subfolder="transformer", dtype=dtype)
    configs = {c: component_config(path, c) for c in ("transformer", "vae")}
    run, resident = real_step(
        model, transformer, configs, inputs, setting, lora=lora or LoraConfig(), device=torch.device("cpu")
    )
    tracker = LiveBytes(resident)
    with tracker:
        run()
    return storage_bytes(resident), tracker.peak, profiled_peak(run)


def _flux() -> tuple[PlanModel, tuple[str, ...]]:
    from qflux.models.flux_kontext.plan import plan_model

    return plan_model(2.5), ("transformer", "vae")


@pytest.mark.parametrize(
    ("setting", "dtype"),
    [
        (Setting("none", False), torch.float32),
        (Setting("none", True), torch.float32),
        (Setting("none", True), torch.bfloat16),
        (Setting("fp8", True), torch.bfloat16),
        (Setting("none", False, blocks_to_swap=2), torch.float32),
    ],
    ids=["fp32", "fp32-checkpointed", "bf16-checkpointed", "fp8-stored", "swap-2"],
)
def test_the_fake_step_is_the_real_step(setting: Setting, dtype: torch.dtype, tiny_flux_dir: Path) -> None:
    model, components = _flux()
    inputs = Inputs(batch_size=2, accumulation=1, target=(64, 48), controls=((64, 48),), text_tokens=16)
    configs = {c: component_config(tiny_flux_dir, c) for c in components}
    planned = estimate(model, configs, inputs, setting, dtype=dtype, lora=LoraConfig())
    resident, allocated, profiled = _real_step(model, tiny_flux_dir, inputs, setting, dtype)
    assert planned.weights + planned.state == resident
    # the fake step allocates exactly what the real step allocates, tensor for tensor
    assert planned.activations + planned.transient == allocated
    if dtype == torch.float32 and not setting.checkpointing:
        # and torch's profiler sees the same peak (in bf16 the CPU's kernels add fp32 workspaces inside
        # operations, which CUDA's do not: benchmarks/memory.py)
        assert allocated == pytest.approx(profiled, rel=0.02)
    elif dtype == torch.float32:
        # With checkpointing the profiler also sees what is made outside the dispatcher while blocks are
        # recomputed at the backward peak: each block's CPU RNG state (5 KiB; on a GPU it stays on the
        # host) and the CPU attention kernel's internal buffers (here 30 + 60 KiB on 450 KiB).
        assert allocated <= profiled <= 1.25 * allocated


@pytest.mark.parametrize(
    ("kind", "optimizer"), [("dora", "adamw"), ("lokr", "adamw"), ("loha", "adamw"), ("lora", "prodigy")]
)
def test_the_fake_step_is_the_real_step_for_each_kind_and_optimizer(
    kind: str, optimizer: str, tiny_flux_dir: Path
) -> None:
    model, components = _flux()
    inputs = Inputs(batch_size=1, accumulation=1, target=(64, 48), controls=((64, 48),), text_tokens=16,
                    optimizer=optimizer)  # fmt: skip
    configs = {c: component_config(tiny_flux_dir, c) for c in components}
    lora = LoraConfig(kind=kind)
    setting = Setting("none", False)
    planned = estimate(model, configs, inputs, setting, dtype=torch.float32, lora=lora)
    resident, allocated, _ = _real_step(model, tiny_flux_dir, inputs, setting, torch.float32, lora)
    assert planned.weights + planned.state == resident
    assert planned.activations + planned.transient == allocated


def test_the_plan_offers_dora_no_block_swap(tiny_flux_dir: Path) -> None:
    from qflux.memory.planner import plan_rows

    model, components = _flux()
    inputs = Inputs(batch_size=1, accumulation=1, target=(64, 48), controls=((64, 48),), text_tokens=16)
    configs = {c: component_config(tiny_flux_dir, c) for c in components}
    setting = Setting("none", False)
    peak = estimate(model, configs, inputs, setting, dtype=torch.float32, lora=LoraConfig()).peak
    kw = {"vram_gib": (peak - 1) / 2**30, "dtype": torch.float32, "encoders": {}}  # one byte too small
    _, rows = plan_rows(model, configs, inputs, setting, lora=LoraConfig(), **kw)
    assert any(r.setting.blocks_to_swap for r in rows)  # LoRA: swapping is offered when nothing fits
    _, rows = plan_rows(model, configs, inputs, setting, lora=LoraConfig(kind="dora"), **kw)
    assert not any(r.setting.blocks_to_swap for r in rows)


def test_qwen_with_two_controls_fake_step_is_the_real_step(tmp_path: Path) -> None:
    from qflux.models.qwen_image_edit.plan import plan_model
    from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit

    path = build_qwen_image_edit(tmp_path / "model", seed=0, variant="edit_plus")
    inputs = Inputs(batch_size=1, accumulation=1, target=(64, 64), controls=((64, 64), (48, 80)), text_tokens=40)
    configs = {c: component_config(path, c) for c in ("transformer", "vae")}
    setting = Setting("none", True)
    planned = estimate(plan_model(), configs, inputs, setting, dtype=torch.float32, lora=LoraConfig())
    resident, allocated, _ = _real_step(plan_model(), path, inputs, setting, torch.float32)
    assert (planned.weights + planned.state, planned.activations + planned.transient) == (resident, allocated)


def test_the_4bit_stand_in_stores_what_bitsandbytes_stores() -> None:
    pytest.importorskip("bitsandbytes")
    from torch import nn

    def layers() -> nn.Module:
        return nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256), nn.Linear(256, 1024)).to(torch.bfloat16)

    real = layers().requires_grad_(False)
    quantize_frozen(real, "nf4")
    with torch.device("meta"):
        fake = layers().requires_grad_(False)
    store_frozen(fake, "nf4")
    assert all(isinstance(m, Fake4bit) for m in fake)
    # bitsandbytes shares its constant code tables between layers; the stand-in keeps one per layer
    assert storage_bytes([*fake.parameters(), *fake.buffers()]) == pytest.approx(weight_bytes(real), rel=0.02)


def test_the_warning_names_the_plan_command() -> None:
    assert too_big(10 * 2**30, 12 * 2**30) is None
    text = too_big(30 * 2**30, 23.5 * 2**30)  # type: ignore[arg-type]
    assert text is not None and "30.0 GiB" in text and "23.5 GiB free" in text and "plan command" in text


def _breakdown_parts(b: Any) -> int:
    return b.weights + b.state + b.activations + b.transient + b.allowance


def test_the_peak_is_the_sum_of_its_parts(tiny_flux_dir: Path) -> None:
    model, components = _flux()
    configs = {c: component_config(tiny_flux_dir, c) for c in components}
    b = estimate(model, configs, Inputs(1, 2, (32, 32), ((32, 32),), 8), Setting("none", False),
                 dtype=torch.float32, lora=LoraConfig())  # fmt: skip
    assert b.peak == _breakdown_parts(b) and b.as_gib()["peak"] == round(b.peak / 2**30, 3)
