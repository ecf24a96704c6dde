"""qflux's predict against FluxKontextPipeline on the same model, image and seed.

    python benchmarks/predict.py [--size=tiny|small] [--steps=8] [--repeats=3] [--dtype=float32]

Both run the same number of denoising steps; the outputs must match (mean absolute difference
≤ 1/255, checked). Timed interleaved after one warm-up each; ends with one line:

    RESULT name=predict_<size>_<dtype> qflux_s=… diffusers_s=… speedup=… mad=…
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(size: str = "tiny", steps: int = 8, repeats: int = 3, dtype: str = "float32") -> None:
    """Build the model, then time both implementations on one control image."""
    from diffusers import FluxKontextPipeline
    from PIL import Image

    from qflux.models.flux_kontext.loaders import load_flux_kontext
    from qflux.models.flux_kontext.predict import predict
    from qflux.models.flux_kontext.tiny import build_flux_kontext
    from qflux.weights.dtypes import torch_dtype

    side = 64 if size == "tiny" else 256
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    wdtype = torch_dtype(dtype)
    with tempfile.TemporaryDirectory(prefix="qflux-bench-predict-") as tmp:
        path = build_flux_kontext(Path(tmp) / "model", seed=0, size=size)
        models = load_flux_kontext(path, wdtype)
        pipe = FluxKontextPipeline.from_pretrained(path, dtype=wdtype)
    pipe.set_progress_bar_config(disable=True)
    seq = 128

    def ours() -> np.ndarray:
        return predict(
            models, image, "invert the colors", guidance_scale=2.5, num_inference_steps=steps, max_sequence_length=seq
        )

    def theirs() -> np.ndarray:
        return pipe(
            image=image,
            prompt="invert the colors",
            height=side,
            width=side,
            max_area=side * side,
            _auto_resize=False,
            guidance_scale=2.5,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(0),
            max_sequence_length=seq,
            output_type="np",
        ).images[0]

    a, b = ours(), theirs()  # warm-up, and the outputs must agree
    mad = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
    assert mad <= 1 / 255, f"outputs differ: mean absolute difference {mad}"
    times: dict[str, list[float]] = {"qflux": [], "diffusers": []}
    for _ in range(repeats):
        for name, fn in (("qflux", ours), ("diffusers", theirs)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    q, d = statistics.median(times["qflux"]), statistics.median(times["diffusers"])
    print(f"RESULT name=predict_{size}_{dtype} qflux_s={q:.4f} diffusers_s={d:.4f} speedup={d / q:.3f} mad={mad:.2e}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
