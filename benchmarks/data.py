"""The image pipeline: pairs per second decoded, cropped and resized into their buckets, and whether
training waits on it.

    python benchmarks/data.py [--pairs=200] [--workers=0,2,4] [--steps=24] [--warmup=4]

1. Writes ``pairs`` synthetic photos (JPEG, quality 90, sizes around 1024² in nine aspects from 3:4
   to 16:9 with ±8% jitter, the control the same size as its target) once, into a temporary folder.
2. For each worker count, times one epoch of the training stream (:func:`qflux.data.order.batch_stream`,
   batch 4, buckets at 1024² area): decode both images, crop and resize (Lanczos), map to [−1, 1],
   collate. Pairs per second include the workers' start.
3. Trains the "small" preset (:func:`qflux.models.flux_kontext.tiny.build_flux_kontext`, uncached, so every step reads
   its images) at 256² buckets with ``data.num_workers: 2``, and measures the time each step spends
   waiting for its batch, after ``warmup`` steps.

Ends with one line:

    RESULT name=data pairs_per_s_w0=… pairs_per_s_w2=… pairs_per_s_w4=… step_s=… wait_s=… wait_fraction=…
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ASPECTS = ((1024, 1024), (1152, 864), (864, 1152), (1216, 832), (832, 1216), (1344, 768), (1280, 960), (960, 1280),
           (1088, 960))  # fmt: skip


def write_photos(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG pairs of about 1024² (a scene of shapes plus texture noise, and its inversion)."""
    from PIL import Image, ImageOps

    from qflux.data.synthetic import draw_scene

    rng = np.random.default_rng(seed)
    (root / "control_images").mkdir(parents=True, exist_ok=True)
    (root / "training_images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = ASPECTS[i % len(ASPECTS)]
        size = (int(w * rng.uniform(0.92, 1.08)), int(h * rng.uniform(0.92, 1.08)))
        scene = np.asarray(draw_scene(rng, size), dtype=np.int16)
        noise = rng.normal(0, 12, (size[1], size[0], 1)).astype(np.int16)  # photo-like texture for the codec
        control = Image.fromarray(np.clip(scene + noise, 0, 255).astype(np.uint8))
        name = f"photo_{i:04d}"
        control.save(root / "control_images" / f"{name}.jpg", quality=90)
        ImageOps.invert(control).save(root / "training_images" / f"{name}.jpg", quality=90)
        (root / "training_images" / f"{name}.txt").write_text("invert the colors of the image\n")
    return root


def pairs_per_second(data: Path, workers: int, batch: int = 4) -> float:
    """One shuffled epoch of the training stream at 1024² buckets: pairs per second."""
    from qflux.data.dataset import PairDataset
    from qflux.data.order import batch_stream
    from qflux.data.pairs import scan_pairs

    samples = scan_pairs(data, 1024 * 1024, multiple=16, buckets="auto", warn=lambda _: None)
    start = time.perf_counter()
    stream = batch_stream(PairDataset(samples), samples, batch, seed=0, shuffle=True, num_workers=workers)
    seen = 0
    for (epoch, _), raw in stream:
        if epoch > 0:
            break
        seen += len(raw["index"])
        if seen == len(samples):
            break
    return seen / (time.perf_counter() - start)


def training_wait(model: Path, data: Path, out: Path, steps: int, warmup: int) -> tuple[float, float]:
    """(median step seconds, median seconds a step waited for its batch) of the small preset
    training uncached at 256² buckets with two data workers, after ``warmup`` steps."""
    import qflux.train.driver as train_loop
    from qflux.config.parse import load_config
    from qflux.models.flux_kontext.config import FluxKontextConfig
    from recipes.flux_kontext_lora import train

    waits: list[float] = []
    original = train_loop.batch_stream

    def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        stream = original(*args, **kwargs)
        while True:
            started = time.perf_counter()
            item = next(stream)
            waits.append(time.perf_counter() - started)
            yield item

    train_loop.batch_stream = timed  # type: ignore[assignment]
    try:
        cfg = load_config(
            FluxKontextConfig,
            None,
            {"model.pretrained_model_name_or_path": str(model), "model.dtype": "float32",
             "model.max_sequence_length": 128, "data.dataset_path": str(data), "data.max_pixels": 256 * 256,
             "data.num_workers": 2, "train.max_train_steps": steps, "logging.output_dir": str(out),
             "logging.write_sample": False, "logging.report_to": "none"},
        )  # fmt: skip
        result = train(cfg)
    finally:
        train_loop.batch_stream = original
    return statistics.median(result.step_seconds[warmup:]), statistics.median(waits[warmup:])


def main(pairs: int = 200, workers: str | tuple[int, ...] = "0,2,4", steps: int = 24, warmup: int = 4) -> None:
    """Write the photos, time the stream per worker count, then the small preset's training wait."""
    from qflux.models.flux_kontext.tiny import build_flux_kontext

    counts = [int(w) for w in (workers.split(",") if isinstance(workers, str) else workers)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        data = write_photos(work / "photos", pairs)
        print(f"wrote {pairs} pairs in {time.perf_counter() - started:.1f} s")
        rates = {}
        for w in counts:
            rates[w] = pairs_per_second(data, w)
            print(f"num_workers {w}: {rates[w]:.1f} pairs/s (decode, crop and resize to 1024² buckets, collate)")
        model = build_flux_kontext(work / "model", seed=0, size="small")
        step_s, wait_s = training_wait(model, data, work / "out", steps, warmup)
        print(f"small preset, 256² buckets, batch 2, num_workers 2: step {step_s:.3f} s, data wait {wait_s:.4f} s")
    parts = [f"pairs_per_s_w{w}={r:.2f}" for w, r in rates.items()]
    parts += [f"step_s={step_s:.4f}", f"wait_s={wait_s:.4f}", f"wait_fraction={wait_s / step_s:.4f}"]
    print("RESULT name=data " + " ".join(parts))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
