"""Training with and without the embedding cache on the "small" model: step time and peak memory.

    python benchmarks/cache.py [--steps=12] [--warmup=3]

Each mode trains in its own subprocess (so peak RSS is that mode's alone) on the same synthetic
256×256 pairs. The cached mode loads only the transformer; the uncached one also holds the VAE,
CLIP and T5 and encodes every batch. Ends with one line:

    RESULT name=cache step_s_uncached=… step_s_cached=… speedup=… rss_mb_uncached=… rss_mb_cached=… rss_saving=…
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(work: Path, mode: str, steps: int):
    from qflux.config.parse import load_config
    from qflux.models.flux_kontext.config import FluxKontextConfig

    return load_config(
        FluxKontextConfig,
        None,
        {
            "model.pretrained_model_name_or_path": str(work / "model"),
            "model.dtype": "float32",
            "model.max_sequence_length": 128,
            "data.dataset_path": str(work / "data"),
            "data.batch_size": 1,
            "cache.cache_dir": str(work / "cache"),
            "cache.use_cache": mode == "cached",
            "train.max_train_steps": steps,
            "logging.output_dir": str(work / f"out-{mode}"),
            "logging.write_sample": False,
        },
    )


def child(work: str, mode: str, steps: int, warmup: int) -> None:
    """One training run; prints a JSON line with the median steady-state step time and peak RSS."""
    from recipes.flux_kontext_lora import train as run

    result = run(_config(Path(work), mode, steps))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("JSON " + json.dumps({"step_s": statistics.median(result.step_seconds[warmup:]), "rss_mb": rss_mb}))


def main(steps: int = 12, warmup: int = 3) -> None:
    """Prepare the model, data and cache, then time both modes in subprocesses."""
    from qflux.data.synthetic import make_synthetic_pairs
    from qflux.models.flux_kontext.tiny import build_flux_kontext
    from recipes.flux_kontext_lora import cache as fill

    with tempfile.TemporaryDirectory(prefix="qflux-bench-cache-") as tmp:
        work = Path(tmp)
        build_flux_kontext(work / "model", seed=0, size="small")
        make_synthetic_pairs(work / "data", 8, seed=0, sizes=((256, 256),))
        fill(_config(work, "cached", steps))
        out = {}
        for mode in ("uncached", "cached"):
            proc = subprocess.run(
                [sys.executable, __file__, "child", str(work), mode, str(steps), str(warmup)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            line = next(x for x in proc.stdout.splitlines() if x.startswith("JSON "))
            out[mode] = json.loads(line[5:])
    u, c = out["uncached"], out["cached"]
    print(
        f"RESULT name=cache step_s_uncached={u['step_s']:.4f} step_s_cached={c['step_s']:.4f} "
        f"speedup={u['step_s'] / c['step_s']:.2f} rss_mb_uncached={u['rss_mb']:.0f} rss_mb_cached={c['rss_mb']:.0f} "
        f"rss_saving={1 - c['rss_mb'] / u['rss_mb']:.2f}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        import fire

        fire.Fire(main)
