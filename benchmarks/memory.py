"""The memory plan against a measured peak: ``plan``'s estimate of one training step (fake tensors,
nothing loaded) against the same step run for real.

    python benchmarks/memory.py [--size=small] [--settings=fp32,fp32-ckpt,bf16-ckpt,swap-2]
    python benchmarks/memory.py --size=full --model=flux|qwen [--settings=bf16-ckpt,fp8-ckpt] [--compile=regional]

``--size=small`` (CPU or GPU):
1. Builds the "small" FLUX.1 Kontext preset (:func:`qflux.models.flux_kontext.tiny.build_flux_kontext`; width 256,
   2 double and 4 single blocks) and plans a step at 512² with a 512² control image, 128 text tokens, batch 1,
   LoRA rank 16 (:func:`qflux.memory.planner.estimate`; the allowance for the CUDA context left out).
2. Runs that step on the real model (:func:`qflux.memory.planner.real_step`) and measures its peak
   independently: on the CPU by torch's profiler memory timeline (every allocation and free, plus
   the resident weights and state; the dispatcher-level count on real tensors in brackets); on CUDA
   by ``torch.cuda.max_memory_allocated``.

``--size=full`` (CUDA): the real transformer of FLUX.1-Kontext-dev or Qwen-Image-Edit (the shapes
qflux ships, random bf16 weights made on the GPU) at 1024² with a 1024² control, the recipes' text
lengths, batch 1, rank 16: the planned peak against ``torch.cuda.max_memory_allocated`` and the
step's seconds (``--compile=regional``: the recipes' default on CUDA; the first steps compile).

bf16 on the CPU is reported but not held to the bound: the CPU's bf16 kernels allocate fp32
workspaces inside operations that CUDA's kernels do not (measured here: the profiler's peak of a
bf16 step is higher than the fp32 step's). Ends with one line (the ratio furthest from 1 among the
settings held to the bound: fp32 on the CPU, all on CUDA; it must lie within 0.8–1.25):

    RESULT name=memory device=… size=… est_vs_measured=… <setting>=<ratio> ... [<setting>_s=<step seconds>]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "fp32": ("float32", "none", False, 0),
    "fp32-ckpt": ("float32", "none", True, 0),
    "bf16": ("bfloat16", "none", False, 0),
    "bf16-ckpt": ("bfloat16", "none", True, 0),
    "fp8-ckpt": ("bfloat16", "fp8", True, 0),
    "swap-2": ("float32", "none", False, 2),
}
FULL = {"flux": "black-forest-labs/FLUX.1-Kontext-dev", "qwen": "Qwen/Qwen-Image-Edit"}


def _model(name: str) -> tuple[Any, int]:
    """(the plan record, text tokens at 1024² with one control) of ``flux`` or ``qwen``."""
    if name == "flux":
        from qflux.models.flux_kontext.plan import plan_model

        return plan_model(2.5), 512
    from qflux.models.qwen_image_edit.plan import plan_model, text_tokens
    from qflux.weights.shapes import shipped_configs

    configs = shipped_configs(FULL["qwen"]) or {}
    return plan_model(), text_tokens(configs["text_encoder"], "edit", 1)


def main(
    size: str = "small",
    model: str = "flux",
    settings: str = "",
    side: int = 0,
    steps: int = 3,
    compile: str = "none",
) -> None:
    import torch

    from qflux.config.schema import LoraConfig
    from qflux.memory.measure import LiveBytes, profiled_peak, storage_bytes
    from qflux.memory.planner import Inputs, Setting, estimate, real_step
    from qflux.models.flux_kontext.tiny import build_flux_kontext
    from qflux.weights.loading import component_config
    from qflux.weights.shapes import shipped_configs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if size == "full" and device.type != "cuda":
        raise SystemExit("--size=full needs a CUDA GPU (the real transformer's weights); use --size=small on CPU")
    full = size == "full"
    names = [s for s in (settings.split(",") if isinstance(settings, str) else settings) if s]
    names = names or (["bf16-ckpt", "fp8-ckpt"] if full else ["fp32", "fp32-ckpt", "bf16-ckpt", "swap-2"])
    side = side or (1024 if full else 512)
    plan_model, tokens = _model(model if full else "flux")
    tokens = tokens if full else 128
    lora = LoraConfig()
    inputs = Inputs(batch_size=1, accumulation=1, target=(side, side), controls=((side, side),), text_tokens=tokens)
    ratios: dict[str, float] = {}
    seconds: dict[str, float] = {}
    held: list[float] = []
    with tempfile.TemporaryDirectory() as work:
        if full:
            configs = {c: v for c, v in (shipped_configs(FULL[model]) or {}).items() if c in ("transformer", "vae")}
        else:
            path = build_flux_kontext(Path(work) / "model", seed=0, size=size)
            configs = {c: component_config(path, c) for c in ("transformer", "vae")}
        print(f"{size} {model if full else 'flux'}, {side}² + control, {tokens} tokens, batch 1, rank {lora.r}, "
              f"{device}, compile {compile}")  # fmt: skip
        print(f"{'setting':<10} {'estimate MB':>12} {'measured MB':>12} {'ratio':>7}")
        for name in names:
            dtype_name, quantize, ckpt, swap = SETTINGS[name]
            dtype = getattr(torch, dtype_name)
            setting = Setting(quantize, ckpt, swap)
            planned = estimate(plan_model, configs, inputs, setting, dtype=dtype, lora=lora)
            planned_bytes = planned.peak - planned.allowance
            cls = plan_model.files.table()["transformer"]
            if full:
                with torch.device("cpu" if swap else device):
                    transformer = cls.from_config(configs["transformer"]).to(dtype)
            else:
                transformer = cls.from_pretrained(path, subfolder="transformer", dtype=dtype)
            run, resident = real_step(plan_model, transformer, configs, inputs, setting, lora=lora, device=device,
                                      compile_mode=compile)  # fmt: skip
            tracked = None
            if device.type == "cuda":
                for _ in range(max(1, steps - 1)):  # warm-up: compiles, the optimizer's first update
                    run()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() - storage_bytes(resident)
                start = time.perf_counter()
                run()
                torch.cuda.synchronize()
                seconds[name] = time.perf_counter() - start
                measured = torch.cuda.max_memory_allocated() - base
            else:
                run()  # the optimizer's first update and lazy buffers are then in place
                measured = storage_bytes(resident) + profiled_peak(run)
                tracker = LiveBytes(resident)
                with tracker:
                    run()
                tracked = storage_bytes(resident) + tracker.peak
            ratio = planned_bytes / measured
            ratios[name] = ratio
            if device.type == "cuda" or dtype == torch.float32:
                held.append(ratio)
            extra = "" if tracked is None else f"  (counted on real tensors: {tracked / 2**20:.1f})"
            extra += f"  step {seconds[name]:.3f} s" if name in seconds else ""
            print(f"{name:<10} {planned_bytes / 2**20:12.1f} {measured / 2**20:12.1f} {ratio:7.3f}{extra}")
            del run, resident, transformer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    worst = max(held, key=lambda r: abs(r - 1)) if held else float("nan")
    fields = " ".join([*(f"{k}={v:.3f}" for k, v in ratios.items()), *(f"{k}_s={v:.3f}" for k, v in seconds.items())])
    label = f"{model}-full" if full else size
    print(f"RESULT name=memory device={device.type} size={label} est_vs_measured={worst:.3f} {fields}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
