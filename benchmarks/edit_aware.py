"""Does ``train.loss_mask: auto`` preserve what should not change? The same run with and without it
on a synthetic edit whose region is known, scored on held-out pairs.

    python benchmarks/edit_aware.py [--pairs=24] [--held=6] [--steps=300] [--size=tiny] [--side=128] [--model=DIR]

1. Writes ``pairs`` training and ``held`` held-out pairs: a scene of shapes with photo-like noise
   (:func:`qflux.data.synthetic.draw_scene`), and as target the same scene with a red disc painted over
   a random spot covering about 6% of the picture; instruction "paint a red dot on the image".
   Everything outside the disc is unchanged.
2. Trains FLUX.1 Kontext (the built-in ``size`` preset, or the diffusers folder ``--model``; fp32,
   rank 16, batch 2, ``steps`` steps)
   with ``train.loss_mask`` none, then auto (``train.unmasked_weight`` 0.25), with the same seed.
3. Validation (every ``steps // 3`` steps, on the held-out pairs, 8 denoising steps) logs
   ``val/psnr_changed`` (prediction against target inside the pair's change mask) and
   ``val/psnr_unchanged`` (prediction against control outside it: preservation).

4. The VAE's own round trip (encode, decode) of the held-out controls, as PSNR: how much of a
   picture this VAE can reproduce at all (with random tiny weights, very little).

Ends with one line (the last validation of each run):

    RESULT name=edit_aware steps=… none_changed=… none_unchanged=… auto_changed=… auto_unchanged=… vae_roundtrip=…
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_pairs(root: Path, n: int, seed: int, side: int) -> Path:
    """``n`` (scene, scene with a red disc) pairs of ``side``² under ``root``."""
    from PIL import Image, ImageDraw

    from qflux.data.synthetic import draw_scene

    rng = np.random.default_rng(seed)
    for sub in ("control_images", "training_images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = np.asarray(draw_scene(rng, (side, side)), dtype=np.int16)
        noise = rng.normal(0, 6, (side, side, 1)).astype(np.int16)
        control = Image.fromarray(np.clip(scene + noise, 0, 255).astype(np.uint8))
        target = control.copy()
        r = side * 0.14  # π r² ≈ 6% of the picture
        cx, cy = rng.uniform(r, side - r, size=2)
        ImageDraw.Draw(target).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(220, 30, 30))
        control.save(root / "control_images" / f"pair_{i:03d}.png")
        target.save(root / "training_images" / f"pair_{i:03d}.png")
        (root / "training_images" / f"pair_{i:03d}.txt").write_text("paint a red dot on the image\n")
    return root


def train(data: Path, held: Path, out: Path, mode: str, steps: int, model: str) -> list[dict[str, float]]:
    """One run; its validation rows from metrics.jsonl."""
    from recipes import flux_kontext_lora

    flux_kontext_lora.main([
        "train", f"--model.pretrained_model_name_or_path={model}", f"--data.dataset_path={data}",
        f"--logging.output_dir={out}", f"--train.max_train_steps={steps}", f"--train.loss_mask={mode}",
        "--train.unmasked_weight=0.25", "--model.dtype=float32", "--data.batch_size=2", "--optimizer.lr=1e-3",
        "--validation.enabled=true", f"--validation.dataset_path={held}", f"--validation.validation_steps={steps // 3}",
        "--validation.num_inference_steps=8", "--logging.report_to=jsonl", "--logging.write_sample=false",
        "--train.checkpointing_steps=0",
    ])  # fmt: skip
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/psnr_changed" in r]


def vae_roundtrip(model: Path, held: Path) -> float:
    """Mean PSNR (dB) of the held-out controls through the model's VAE and back: the scale of what
    this VAE can reproduce at all (a random tiny VAE keeps every pixel metric near it)."""
    import torch
    from diffusers import AutoencoderKL

    from qflux.data.images import image_size, load_sized
    from qflux.data.masks import region_psnr

    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    scores = []
    with torch.no_grad():
        for path in sorted((held / "control_images").glob("*.png")):
            x = load_sized(path, image_size(path))
            back = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            scores.append(float(region_psnr((x[0] + 1) / 2, (back[0] + 1) / 2, torch.ones(1, *x.shape[-2:]))))
    return sum(scores) / len(scores)


def main(
    pairs: int = 24, held: int = 6, steps: int = 300, size: str = "tiny", side: int = 128, model: str = ""
) -> None:
    from qflux.models.flux_kontext.tiny import build_flux_kontext

    start = time.perf_counter()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        data, heldout = write_pairs(root / "train", pairs, 0, side), write_pairs(root / "held", held, 1, side)
        folder = Path(model) if model else build_flux_kontext(root / "model", seed=0, size=size)
        for mode in ("none", "auto"):
            results[mode] = train(data, heldout, root / mode, mode, steps, str(folder))
        roundtrip = vae_roundtrip(folder, heldout)
    print(f"{'step':>6} {'none: changed':>14} {'unchanged':>10} {'auto: changed':>14} {'unchanged':>10}  (dB)")
    for a, b in zip(results["none"], results["auto"], strict=True):
        print(f"{a['step']:6d} {a['val/psnr_changed']:14.2f} {a['val/psnr_unchanged']:10.2f} "
              f"{b['val/psnr_changed']:14.2f} {b['val/psnr_unchanged']:10.2f}")  # fmt: skip
    fields = " ".join(
        f"{m}_{k}={rows[-1]['val/psnr_' + k]:.2f}" for m, rows in results.items() for k in ("changed", "unchanged")
    )
    print(f"the VAE's own round trip of the held-out controls: {roundtrip:.2f} dB")
    print(f"RESULT name=edit_aware size={size} steps={steps} seconds={time.perf_counter() - start:.0f} {fields} "
          f"vae_roundtrip={roundtrip:.2f}")  # fmt: skip


if __name__ == "__main__":
    import fire

    fire.Fire(main)
