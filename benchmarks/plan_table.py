"""The full-size memory table of docs/memory.md, from ``plan``'s estimator (fake tensors, no weights,
no GPU): FLUX.1-Kontext-dev at 1024² and 512² with one control image, Qwen-Image-Edit at 1024²,
Qwen-Image-Edit-2509 at 1024² with one and three controls, and FLUX.2 [dev] at 1024² with one reference;
each in bf16, fp8 and nf4 storage, with and without gradient checkpointing, and each storage with
checkpointing plus the fewest swapped blocks that fit 24 GiB (and 16 GiB). Batch 1, LoRA rank 16 on the
recipes' default targets, cached embeddings (encoders not loaded), the 1 GiB allowance for the CUDA context
included.

    python benchmarks/plan_table.py [--only=kontext-1024,...] > table.md

Prints a Markdown table (peak GiB, and the card classes of 12, 16, 24, 48 and 80 GB it fits) and
ends with one line:

    RESULT name=plan_table kontext_1024_nf4_ckpt=… kontext_1024_fp8_ckpt=… kontext_1024_bf16_swap=… ...
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CARDS = (12, 16, 24, 48, 80)
SCENARIOS = {
    "kontext-1024": ("black-forest-labs/FLUX.1-Kontext-dev", "flux", 1024, 1),
    "kontext-512": ("black-forest-labs/FLUX.1-Kontext-dev", "flux", 512, 1),
    "qwen-edit-1024": ("Qwen/Qwen-Image-Edit", "edit", 1024, 1),
    "qwen-2509-1024-1": ("Qwen/Qwen-Image-Edit-2509", "edit_plus", 1024, 1),
    "qwen-2509-1024-3": ("Qwen/Qwen-Image-Edit-2509", "edit_plus", 1024, 3),
    "flux2-dev-1024": ("black-forest-labs/FLUX.2-dev", "flux2_dev", 1024, 1),
}


def _scenario(name: str) -> tuple[Any, dict[str, Any], Any]:
    import qflux.models  # noqa: F401  (registers the shipped shapes)
    from qflux.memory.planner import Inputs
    from qflux.weights.shapes import shipped_configs

    hub, variant, side, controls = SCENARIOS[name]
    configs = shipped_configs(hub) or {}
    if variant == "flux":
        from qflux.models.flux_kontext.plan import plan_model

        model, tokens = plan_model(2.5), 512
    elif variant == "flux2_dev":
        from qflux.models.flux2.loaders import DEV
        from qflux.models.flux2.plan import plan_model as flux2_plan_model

        model, tokens = flux2_plan_model(DEV, 4.0), 512
    else:
        from qflux.models.qwen_image_edit.plan import plan_model, text_tokens

        model, tokens = plan_model(), text_tokens(configs["text_encoder"], variant, controls)
    inputs = Inputs(batch_size=1, accumulation=1, target=(side, side), controls=((side, side),) * controls,
                    text_tokens=tokens)  # fmt: skip
    return model, {c: configs[c] for c in ("transformer", "vae")}, inputs


def main(only: str = "") -> None:
    import torch

    from qflux.config.schema import LoraConfig
    from qflux.memory.measure import GIB
    from qflux.memory.planner import Row, Setting, block_weights, blocks_needed, estimate

    names = [n for n in (only.split(",") if isinstance(only, str) else only) if n] or list(SCENARIOS)
    lora, dtype = LoraConfig(), torch.bfloat16
    result: dict[str, float] = {}
    print("| model, size | storage | checkpointing | blocks swapped | peak GiB | weights | activations | fits |")
    print("|---|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    for name in names:
        model, configs, inputs = _scenario(name)
        side, n = inputs.target[0], len(inputs.controls)

        def peak(s: Setting, model: Any = model, configs: Any = configs, inputs: Any = inputs) -> Row:
            return Row(s, estimate(model, configs, inputs, s, dtype=dtype, lora=lora))

        rows = [peak(Setting(q, c)) for q in ("none", "fp8", "nf4") for c in (False, True)]
        for quantize in ("none", "fp8", "nf4"):
            row = next(r for r in rows if r.setting == Setting(quantize, True))
            blocks = block_weights(model, configs["transformer"], dtype, quantize)
            for card in (24, 16):
                needed = blocks_needed(row, blocks, card)
                if needed and all(r.setting.blocks_to_swap != needed or r.setting.quantize != quantize for r in rows):
                    rows.append(peak(Setting(quantize, True, needed)))
        for r in rows:
            s, b = r.setting, r.breakdown
            fits = ", ".join(str(c) for c in CARDS if b.peak <= c * GIB) or "none of these"
            storage = {"none": "bf16"}.get(s.quantize, s.quantize)
            label = f"{name} ({side}², {n} control{'s' if n > 1 else ''})"
            print(f"| {label} | {storage} | {'on' if s.checkpointing else 'off'} | {s.blocks_to_swap} | "
                  f"{b.peak / GIB:.1f} | {b.weights / GIB:.1f} | {b.activations / GIB:.1f} | {fits} |")  # fmt: skip
            key = f"{name.replace('-', '_')}_{storage}_{'ckpt' if s.checkpointing else 'nockpt'}"
            result[key + (f"_swap{s.blocks_to_swap}" if s.blocks_to_swap else "")] = b.peak / GIB
        sys.stdout.flush()
    fields = " ".join(f"{k}={v:.2f}" for k, v in result.items())
    print(f"\nRESULT name=plan_table seconds={time.perf_counter() - start:.0f} {fields}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
