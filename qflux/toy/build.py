"""Building a family's toy model on the toy world, in stages that each leave a loadable diffusers folder:

1. ``start``: the random model (:attr:`qflux.train.family.ToyModel.start`), its tokenizer knowing every
   word of the grammar (:data:`qflux.toy.edits.VOCABULARY`);
2. ``vae``: the VAE trained to reconstruct scenes (:mod:`qflux.toy.vae_training`), its latent statistics
   written to its config;
3. ``pretrain``: the transformer trained from scratch on the taught edits (:mod:`qflux.toy.pretraining`);
4. ``stored``: every weight file rewritten in bf16, which is what is committed (half the bytes).

Each stage is seeded and writes ``toy_build.json`` beside the model: what ran, its cost and its measures.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch
from tqdm import tqdm

from qflux.data.pairs import PairSample, scan_pairs
from qflux.toy.edits import VOCABULARY, write_pairs
from qflux.toy.pretraining import PretrainSettings, edit_scores, pretrain
from qflux.toy.vae_training import VaeSettings, latent_statistics, reconstruction_psnr, train_vae
from qflux.train.family import ToyModel
from qflux.train.run import image_multiple
from qflux.weights.loading import load_part

RECORD = "toy_build.json"
"""The build's record in the model folder."""


def _record(folder: Path, stage: str, entry: dict[str, Any]) -> None:
    path = folder / RECORD
    record = json.loads(path.read_text()) if path.exists() else {}
    record[stage] = entry
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def build_start(folder: Path, toy: ToyModel, seed: int) -> Path:
    """Stage 1: the untrained toy model in ``folder``."""
    toy.start(folder, VOCABULARY, seed)
    _record(folder, "start", {"seed": seed, "words": len(VOCABULARY)})
    return folder


def build_vae(folder: Path, toy: ToyModel, settings: VaeSettings) -> float:
    """Stage 2: train the folder's VAE on scenes, set its ``shift_factor`` / ``scaling_factor`` to the
    latents' mean and 1 / std, save it; returns the held-out reconstruction PSNR (dB)."""
    vae = load_part(toy.files, folder, "vae", torch.float32).requires_grad_(True)
    start = time.perf_counter()
    train_vae(vae, settings, progress=partial(tqdm, desc="toy VAE", unit="step"))
    seconds = time.perf_counter() - start
    vae.requires_grad_(False)
    mean, std = latent_statistics(vae, seed=settings.seed + 1, size=settings.size)
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    vae.save_pretrained(folder / "vae")
    held_out = reconstruction_psnr(vae, seed=settings.seed + 2, size=settings.size)
    _record(folder, "vae", {**attrs.asdict(settings), "seconds": round(seconds), "psnr_held_out": round(held_out, 2),
                            "shift_factor": mean, "scaling_factor": 1.0 / std})  # fmt: skip
    return held_out


def build_transformer(folder: Path, toy: ToyModel, settings: PretrainSettings, work: Path) -> tuple[float, float]:
    """Stage 3: pretrain the folder's transformer on ``settings.pairs`` pairs of the taught edits (written under
    ``work``), save the weights' moving average; returns (psnr_changed, psnr_unchanged) on held-out pairs."""
    models = toy.files.load(folder, torch.float32)
    data, ops = toy.paths(models)
    multiple = image_multiple(folder)

    def pairs(name: str, n: int, seed: int) -> list[PairSample]:
        root = write_pairs(work / name, settings.edits, n, seed, settings.size)
        return scan_pairs(root, None, multiple=multiple, warn=lambda _: None)

    train, held_out = (
        pairs("train", settings.pairs, settings.seed),
        pairs("held_out", settings.eval_pairs, settings.seed + 1),
    )
    start, curve, losses = time.perf_counter(), [], []

    def log(step: int, loss: float) -> None:
        losses.append(loss)
        if (step + 1) % 100 == 0:
            tqdm.write(f"step {step + 1}: loss {sum(losses[-100:]) / 100:.4f}")

    def measure(step: int, ema: dict[str, torch.Tensor]) -> None:  # the average's scores, the weights kept
        own = {k: v.clone() for k, v in models.transformer.state_dict().items()}
        models.transformer.load_state_dict(ema)
        changed, unchanged = edit_scores(data, ops, held_out, {}, settings.sample_steps)
        models.transformer.load_state_dict(own)
        seconds = round(time.perf_counter() - start)
        curve.append({"step": step, "seconds": seconds, "psnr_changed": round(changed, 2),
                      "psnr_unchanged": round(unchanged, 2)})  # fmt: skip
        tqdm.write(f"step {step} ({seconds} s): psnr_changed {changed:.2f} dB, psnr_unchanged {unchanged:.2f} dB")

    ema = pretrain(models.transformer, data, ops, train, models.scheduler.config, settings,
                   progress=partial(tqdm, desc="toy transformer", unit="step"), log=log, every=measure)  # fmt: skip
    seconds = time.perf_counter() - start
    models.transformer.load_state_dict(ema)
    models.transformer.save_pretrained(folder / "transformer")
    changed, unchanged = edit_scores(data, ops, held_out, {}, settings.sample_steps)
    scores = {"psnr_changed": round(changed, 2), "psnr_unchanged": round(unchanged, 2)}
    _record(folder, "transformer", {**attrs.asdict(settings), "seconds": round(seconds), **scores, "curve": curve})
    return changed, unchanged


def store(folder: Path, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """Stage 4: rewrite the folder's weight files with their floating-point tensors in ``dtype`` (the configs
    stay; loaders cast to the run's dtype); returns the files."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    files = sorted(folder.rglob("*.safetensors"))
    for path in files:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}
        save_file(tensors, path, metadata=metadata)
    _record(folder, "stored", {"dtype": str(dtype).removeprefix("torch."),
                               "bytes": sum(p.stat().st_size for p in files)})  # fmt: skip
    return files
