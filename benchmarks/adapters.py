"""Adapter kinds and optimizers on one step: trainable parameters, peak memory and step time.

    python benchmarks/adapters.py [--size=small] [--side=512] [--steps=6] [--dtype=float32]

Builds the FLUX.1 Kontext preset ``--size`` (:func:`qflux.models.flux_kontext.tiny.build_flux_kontext`; "small": width
256, 2 double and 4 single blocks), and for each (``model.lora.kind``, ``optimizer.name``) of
lora/adamw, dora/adamw, lokr/adamw, loha/adamw and lora/prodigy runs the recipes' training step
(:func:`qflux.memory.planner.real_step`: the adapter injected by peft, the pure step, the autograd engine) at
``--side``² with a control image of the same size, 128 text tokens, batch 1, rank 16 on the default
targets (to_q, to_k, to_v, to_out.0). Per row: the adapter's trainable parameters, the state's
bytes (the fp32 adapter the step trains and the optimizer's state), the step's peak (torch's
profiler memory timeline plus the resident tensors, as benchmarks/memory.py) and the median step
time over ``--steps`` steps (after one warm-up step).

Ends with one line (ratios against lora/adamw):

    RESULT name=adapters size=… <kind>_<optimizer>_mem=<peak ratio> <kind>_<optimizer>_time=<step-time ratio> ...
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = [("lora", "adamw"), ("dora", "adamw"), ("lokr", "adamw"), ("loha", "adamw"), ("lora", "prodigy")]


def main(size: str = "small", side: int = 512, steps: int = 6, dtype: str = "float32") -> None:
    import torch

    from qflux.config.schema import LoraConfig
    from qflux.memory.measure import profiled_peak, storage_bytes
    from qflux.memory.planner import Inputs, Setting, real_step
    from qflux.models.flux_kontext.plan import plan_model
    from qflux.models.flux_kontext.tiny import build_flux_kontext
    from qflux.weights.loading import component_config

    torch_dtype = getattr(torch, dtype)
    model = plan_model(2.5)
    results: dict[tuple[str, str], tuple[int, int, float, float]] = {}
    with tempfile.TemporaryDirectory() as work:
        path = build_flux_kontext(Path(work) / "model", seed=0, size=size)
        configs = {c: component_config(path, c) for c in ("transformer", "vae")}
        cls = model.files.table()["transformer"]
        print(f"{size} FLUX.1 Kontext, {side}² + control, 128 tokens, batch 1, rank 16, {dtype}, cpu, eager")
        print(f"{'kind':<6} {'optimizer':<9} {'params':>9} {'state MB':>12} {'peak MB':>9} {'step s':>8}")
        for kind, optimizer in ROWS:
            inputs = Inputs(batch_size=1, accumulation=1, target=(side, side), controls=((side, side),),
                            text_tokens=128, optimizer=optimizer)  # fmt: skip
            transformer = cls.from_pretrained(path, subfolder="transformer", dtype=torch_dtype)
            run, resident = real_step(model, transformer, configs, inputs, Setting("none", False, 0),
                                      lora=LoraConfig(kind=kind), device=torch.device("cpu"))  # fmt: skip
            params = sum(p.numel() for n, p in transformer.named_parameters() if _is_adapter(n))
            module = storage_bytes([*transformer.parameters(), *transformer.buffers()])
            run()  # the first update and lazy buffers
            peak = storage_bytes(resident) + profiled_peak(run)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            opt_bytes = storage_bytes(resident) - module  # the trained fp32 adapter and the optimizer's state
            results[(kind, optimizer)] = (params, opt_bytes, peak, statistics.median(times))
            print(f"{kind:<6} {optimizer:<9} {params:9d} {opt_bytes / 2**20:12.2f} {peak / 2**20:9.1f} "
                  f"{statistics.median(times):8.3f}")  # fmt: skip
            del run, resident, transformer
    _, _, peak0, time0 = results[ROWS[0]]
    fields = " ".join(
        f"{k}_{o}_mem={peak / peak0:.3f} {k}_{o}_time={t / time0:.3f}" for (k, o), (_, _, peak, t) in results.items()
    )
    print(f"RESULT name=adapters size={size} side={side} {fields}")


def _is_adapter(name: str) -> bool:
    from qflux.lora.kinds import is_adapter_param

    return is_adapter_param(name)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
