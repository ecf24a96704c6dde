"""Pretraining a toy model's transformer from scratch on the toy world's taught edits, with qflux's own
data path, loss and sampler (the family's :class:`~qflux.train.batch.DataPath` and
:class:`~qflux.train.run.ModelOps`): full-parameter flow matching,

    x_t = (1 − σ)·x0 + σ·ε,   loss = mean (v̂(x_t, σ, control, text) − (ε − x0))²,   σ = sigmoid(N(0, 1))

over every transformer weight, AdamW with a linear warm-up and a cosine decay, and an exponential moving
average of the weights, which is what is saved and measured. The pairs are encoded once (VAE latents and
prompt embeddings), then each step draws a batch of them, its noise and σ from generators keyed by
(seed, step). Nothing here names a model family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import numpy as np
import torch

from qflux.data.images import to_image
from qflux.data.pairs import PairSample
from qflux.toy.edits import TAUGHT
from qflux.toy.vae_training import toy_lr
from qflux.train.batch import Conditioning, DataPath, Draws, prepare
from qflux.train.run import ModelOps
from qflux.train.validation import edit_metrics, edit_reference

Weights = dict[str, torch.Tensor]
"""A module's weights by parameter name."""


@attrs.frozen
class PretrainSettings:
    """How a toy transformer pretrains."""

    steps: int = 2400
    batch_size: int = 32
    lr: float = 5e-4
    """Peak AdamW learning rate: linear warm-up over ``warmup`` steps, then cosine to 5% of it (:func:`toy_lr`)."""
    warmup: int = 100
    ema: float = 0.995
    """Decay of the weights' moving average (saved and measured)."""
    pairs: int = 6000
    """Training pairs of the taught edits (encoded once)."""
    eval_pairs: int = 32
    sample_steps: int = 16
    eval_every: int = 400
    """Steps between measurements of the moving average on the held-out pairs (the build's curve)."""
    seed: int = 0
    size: int = 64
    edits: tuple[str, ...] = TAUGHT


@torch.no_grad()
def encode_all(data: DataPath, samples: Sequence[PairSample], chunk: int = 64) -> Conditioning:
    """Every sample's conditioning, concatenated along the batch (the samples share one size)."""
    dataset = data.make_dataset(list(samples))
    parts = [data.to_conditioning(data.collate([dataset[i] for i in range(s, min(s + chunk, len(samples)))]))
             for s in range(0, len(samples), chunk)]  # fmt: skip
    return Conditioning(
        latents=torch.cat([p.latents for p in parts]),
        controls=tuple(torch.cat(group) for group in zip(*(p.controls for p in parts), strict=True)),
        text={k: torch.cat([p.text[k] for p in parts]) for k in parts[0].text},
    )


def rows(cond: Conditioning, index: torch.Tensor) -> Conditioning:
    """The conditioning of the samples at ``index`` [B]."""
    return Conditioning(cond.latents[index], tuple(c[index] for c in cond.controls),
                        {k: v[index] for k, v in cond.text.items()})  # fmt: skip


def pretrain(transformer: torch.nn.Module, data: DataPath, ops: ModelOps, samples: Sequence[PairSample],
             scheduler_config: Any, settings: PretrainSettings,
             progress: Callable[[Iterable[int]], Iterable[int]] = iter,
             log: Callable[[int, float], None] = lambda step, loss: None,
             every: Callable[[int, Weights], None] = lambda step, ema: None) -> Weights:  # fmt: skip
    """Train every weight of ``transformer`` on ``samples``; returns the moving average of its weights
    (its own weights end as the last step's). ``every(step, ema)`` runs each ``settings.eval_every`` steps."""
    cond = encode_all(data, samples)
    transformer.requires_grad_(True).train()
    params = dict(transformer.named_parameters())
    ema = {k: v.detach().clone() for k, v in params.items()}
    loss_fn = ops.make_loss(transformer)
    opt = torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=0.0)
    draws = Draws(timestep_sampling="logit_normal")
    pick = torch.Generator().manual_seed(settings.seed)
    for step in progress(range(settings.steps)):
        for group in opt.param_groups:
            group["lr"] = toy_lr(settings.lr, step, settings.steps, settings.warmup)
        index = torch.randint(len(samples), (settings.batch_size,), generator=pick)
        batch = ops.to_batch(prepare(draws, scheduler_config, rows(cond, index), data.empty, (settings.seed, step)))
        loss = loss_fn({}, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in params.items():  # ema ← d·ema + (1 − d)·θ
                ema[k].lerp_(v.detach(), 1 - settings.ema)
        log(step, loss.item())
        if (step + 1) % settings.eval_every == 0 and step + 1 < settings.steps:
            every(step + 1, ema)
    transformer.requires_grad_(False).eval()
    return ema


@torch.no_grad()
def edit_scores(data: DataPath, ops: ModelOps, samples: Sequence[PairSample], lora: dict[str, torch.Tensor],
                steps: int) -> tuple[float, float]:  # fmt: skip
    """Mean (psnr_changed, psnr_unchanged) in dB of the model's edits of ``samples`` (sampled with ``steps``
    steps, the run's seed), against their targets inside the change and their controls outside it."""
    dataset = data.make_dataset(list(samples))
    scores = []
    for i, sample in enumerate(samples):
        cond = data.to_conditioning(data.collate([dataset[i]]))
        image = to_image(ops.decode([ops.preview(cond, lora, steps)])[0].float())
        scores.append(edit_metrics(image, edit_reference(sample)))
    return _mean([c for c, _ in scores]), _mean([u for _, u in scores])


def _mean(values: Sequence[float]) -> float:
    """The mean of the finite values (a global edit has no unchanged region), NaN when there are none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
