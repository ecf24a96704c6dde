"""From encoded conditioning to a training micro-batch: per-sample encoding, keyed draws, dropout and
σ, shared by every model (FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2 [klein]).

A model's conditioning is its target latents, its control latents (one tensor per control image)
and its prompt tensors (a dict: FLUX's CLIP pooled + T5 tokens, Qwen's embeddings + mask). Per
sample i of a micro-batch, from a generator keyed by (seed, step, micro-batch, global index i):

    drop caption → the prompt tensors of the empty instruction
    drop image   → every control latent × 0
    ε ~ N(0, I),  u ~ density(timestep_sampling),  σ = sigmas_from_u(u)  (shifted by the shift samplers)

and per micro-batch, from the generator keyed by (seed, step, micro-batch, ROUTE_STREAM), the routing scores
(``train.route``; :func:`qflux.diffusion.routing.draw_scores`).

This all runs outside the gradient, before ``train_step``, and is the same whether the
conditioning came from the encoders or from the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import torch

from qflux.config.schema import DataConfig, TrainConfig
from qflux.data.pairs import PairSample
from qflux.diffusion.flow import FlowBatch, TimestepSampling, resolution_mu, shifted_sigmas, sigmas_from_u
from qflux.diffusion.rng import draw_sample_randomness, keyed_generator
from qflux.diffusion.routing import draw_scores

B = TypeVar("B", bound=FlowBatch)
ROUTE_STREAM = -1
"""The last key of a micro-batch's routing draw (a sample's draws end in its index, ≥ 0)."""


@attrs.frozen(eq=False)
class Conditioning:
    """A micro-batch's encoded inputs before dropout."""

    latents: torch.Tensor
    """Target latents [B, C, h, w]."""
    controls: tuple[torch.Tensor, ...]
    """Control latents, one [B, C, hc_k, wc_k] per control image k (empty: no control image)."""
    text: Mapping[str, torch.Tensor]
    """The model's prompt tensors, batch first (e.g. pooled [B, P] and tokens [B, S, D])."""
    empty: Mapping[str, torch.Tensor] | None = None
    """Each sample's empty-instruction prompt tensors [B, ...], for a model whose prompt embedding
    sees the sample's images (Qwen); None: the model's one empty prompt is used."""
    mask: torch.Tensor | None = None
    """Where the edit happens, on the latent grid [B, 1, h, w] in [0, 1] (``train.loss_mask``);
    None: the loss weighs every latent pixel alike."""
    preserve: Mapping[str, torch.Tensor] | None = None
    """Each sample's preserve-prompt tensors [B, ...] (``train.preserve_prompt``), for a model whose prompt
    embedding sees the sample's images (Qwen); None: the data path's one, if any."""


def encode_pairs(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    raw: Mapping[str, Any],
    text: Mapping[str, torch.Tensor],
    empty: Mapping[str, torch.Tensor] | None = None,
) -> Conditioning:
    """The conditioning of a collated image batch (:func:`qflux.data.dataset.collate_pairs`) whose
    prompts are already encoded.

    The target [B, 3, H, W] and each control [B, 3, H_k, W_k] go through ``encode_image`` one sample
    at a time, exactly as the cache encodes them, so training with and without the cache sees
    bit-identical latents [B, C, H/f, W/f].

    Args:
        encode_image: a model's VAE encoder, images [1, 3, H, W] → latents [1, C, H/f, W/f].
        text, empty: :attr:`Conditioning.text` and :attr:`Conditioning.empty`.
    """
    n = len(raw["prompt"])

    def each(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([encode_image(images[i : i + 1]) for i in range(n)])

    return Conditioning(
        latents=each(raw["target"]), controls=tuple(each(x) for x in raw["controls"]), text=text, empty=empty
    )


def cat_rows(rows: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-sample prompt tensors {name: [1, ...]} → the batch's {name: [B, ...]} (same-length tokens)."""
    return {key: torch.cat([r[key] for r in rows]) for key in rows[0]}


def with_mask(to_conditioning: Callable[[dict[str, Any]], Conditioning]) -> Callable[[dict[str, Any]], Conditioning]:
    """``to_conditioning`` that also carries a collated batch's change masks (``raw["mask"]``)."""

    def convert(raw: dict[str, Any]) -> Conditioning:
        cond = to_conditioning(raw)
        return cond if raw.get("mask") is None else attrs.evolve(cond, mask=raw["mask"])

    return convert


@attrs.frozen
class Draws:
    """How a micro-batch's randomness is drawn: dropout rates, the timestep sampler and its settings."""

    caption_dropout_rate: float = 0.0
    image_dropout_rate: float = 0.0
    timestep_sampling: TimestepSampling = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 3.0
    """s of the 'shift' sampler."""
    mu: Callable[[int], float] | None = None
    """The family pipeline's μ for an image of that many tokens ('resolution_shift'); None: the scheduler
    config's linear μ (:func:`qflux.diffusion.flow.resolution_mu`), as FLUX.1 and Qwen compute it."""
    route: bool = False
    """Draw routing scores (``train.route: tread`` with a positive route_ratio)."""
    route_keep_changed: bool = False
    """Raise the changed tokens' scores above the rest (``train.route_keep_changed``)."""

    @classmethod
    def from_config(cls, data: DataConfig, train: TrainConfig, mu: Callable[[int], float] | None = None) -> Draws:
        """The draws the ``data`` and ``train`` sections configure, with the family's μ rule (``ModelOps.mu``)."""
        return cls(
            data.caption_dropout_rate,
            data.prompt_image_dropout_rate,
            train.timestep_sampling,
            train.logit_mean,
            train.logit_std,
            train.mode_scale,
            train.timestep_shift,
            mu,
            train.route == "tread" and train.route_ratio > 0,
            train.route_keep_changed,
        )

    def without_dropout(self) -> Draws:
        """The same draws with caption and control dropout and routing off (evaluation)."""
        return attrs.evolve(self, caption_dropout_rate=0.0, image_dropout_rate=0.0, route=False)


@attrs.frozen(eq=False)
class DataPath:
    """Where a run's conditioning comes from: the encoders, or the cache."""

    make_dataset: Callable[[list[PairSample]], Any]
    """A map-style dataset over samples (training, or validation through the same path)."""
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    to_conditioning: Callable[[dict[str, Any]], Conditioning]
    """A collated batch's :class:`Conditioning` (encoded here, or read from the cache)."""
    empty: Mapping[str, torch.Tensor] | None
    """The empty prompt's tensors [1, ...], or None when each sample's conditioning carries its own."""
    preserve: Mapping[str, torch.Tensor] | None = None
    """The preserve prompt's tensors [1, ...] (``train.preserve_prompt``), or None (none, or each sample's
    conditioning carries its own)."""


@attrs.frozen(eq=False, kw_only=True)
class Prepared(FlowBatch):
    """A micro-batch after dropout and the random draws, on the training device: x0, ε, σ and the
    change mask (:class:`~qflux.diffusion.flow.FlowBatch`), and the model's
    conditioning under the shared names (:func:`to_record` renames it into the model's batch record)."""

    controls: tuple[torch.Tensor, ...]
    """Control latents [B, C, hc_k, wc_k] float32; zeros for samples whose image was dropped."""
    text: dict[str, torch.Tensor]
    """Prompt tensors with dropped captions replaced by the empty instruction's."""


def to_record(make: Callable[..., B], p: Prepared, **conditioning: Any) -> B:
    """A model's batch record (a :class:`~qflux.diffusion.flow.FlowBatch`, built by ``make``): x0, ε, σ
    and the change mask of ``p``, and the model's ``conditioning`` fields (its names for ``p``'s
    controls and prompt tensors)."""
    return make(latents=p.latents, noise=p.noise, sigmas=p.sigmas, change=p.change, preserve=p.preserve,
                route=p.route, **conditioning)  # fmt: skip


def sigmas_for(draws: Draws, scheduler_config: Any, u: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """σ from density draws u [B] on the scheduler's training steps, shifted as ``draws.timestep_sampling`` says.

    Args:
        hw: latent (h, w); the image has (h/2)·(w/2) tokens (2×2 packing), the μ of 'resolution_shift'.
    """
    sc = scheduler_config
    sigmas = sigmas_from_u(u, sc.num_train_timesteps)
    if draws.timestep_sampling != "resolution_shift":
        return shifted_sigmas(draws.timestep_sampling, sigmas, shift=draws.shift)
    tokens = (hw[0] // 2) * (hw[1] // 2)
    if draws.mu is not None:
        mu = draws.mu(tokens)
    else:
        mu = resolution_mu(tokens, sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift)
    return shifted_sigmas("resolution_shift", sigmas, mu=mu)


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 of ``x`` [B, S, ...] to ``length`` (no copy when it already has it)."""
    if x.shape[1] == length:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


def where_dropped(
    drop: torch.Tensor, text: Mapping[str, torch.Tensor], empty: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per sample, ``empty``'s prompt tensors where ``drop`` [B] is set, else ``text``'s.

    ``empty`` holds one row (shared by all samples) or one per sample. Token tensors of different
    lengths (a per-sample embedding and its mask) are zero-padded to the longer one first.
    """
    out = {}
    for key, t in text.items():
        e = empty[key].to(t)
        if t.ndim >= 2 and e.shape[1] != t.shape[1]:
            length = max(t.shape[1], e.shape[1])
            t, e = pad_tokens(t, length), pad_tokens(e, length)
        out[key] = torch.where(drop.to(t.device).view(-1, *([1] * (t.ndim - 1))), e, t)
    return out


@torch.no_grad()
def prepare(
    draws: Draws,
    scheduler_config: Any,
    cond: Conditioning,
    empty: Mapping[str, torch.Tensor] | None,
    keys: tuple[int, ...],
    device: torch.device | str = "cpu",
    first_index: int = 0,
    preserve: Mapping[str, torch.Tensor] | None = None,
) -> Prepared:
    """Apply caption and control dropout, draw noise and σ, and move everything to ``device``.

    Args:
        empty: the empty instruction's prompt tensors [1, ...], used unless ``cond.empty`` holds
            per-sample ones.
        preserve: the preserve prompt's tensors [1, ...] (:attr:`DataPath.preserve`), used unless
            ``cond.preserve`` holds per-sample ones; neither: no preserve prompt.
        keys: randomness keys (seed, step, micro-batch); sample i draws from keys + (first_index + i,).
        first_index: this batch's offset in the global batch (data-parallel ranks).
    """
    b, c, h, w = cond.latents.shape
    drawn = draw_sample_randomness(
        keys,
        b,
        (c, h, w),
        caption_dropout_rate=draws.caption_dropout_rate,
        image_dropout_rate=draws.image_dropout_rate,
        timestep_sampling=draws.timestep_sampling,
        logit_mean=draws.logit_mean,
        logit_std=draws.logit_std,
        mode_scale=draws.mode_scale,
        first_index=first_index,
    )
    blank = cond.empty if cond.empty is not None else empty
    if blank is None:
        raise ValueError("no empty-prompt tensors: pass empty, or conditioning that carries its own")
    text = where_dropped(drawn.drop_caption, cond.text, blank)
    keep = (~drawn.drop_image).float().view(b, 1, 1, 1)
    kept = cond.preserve if cond.preserve is not None else preserve
    change = None if cond.mask is None else cond.mask.float()
    # the routing subset: one per micro-batch, from the step's keys alone (the same on 1 or N ranks)
    route = None
    if draws.route:
        route = draw_scores(keyed_generator(*keys, ROUTE_STREAM), (h, w), change if draws.route_keep_changed else None)
    return Prepared(
        latents=cond.latents.float().to(device),
        controls=tuple(x.to(device, torch.float32) * keep.to(device) for x in cond.controls),
        text={k: t.to(device) for k, t in text.items()},
        noise=drawn.noise.to(device),
        sigmas=sigmas_for(draws, scheduler_config, drawn.u, (h, w)).to(device),
        change=None if change is None else change.to(device),
        preserve=None if kept is None else {k: t.expand(b, *t.shape[1:]).to(device) for k, t in kept.items()},
        route=None if route is None else route.to(device),
    )


def eval_batches(
    assemble: Callable[[Conditioning, tuple[int, ...]], B],
    conds: Sequence[Conditioning],
    *,
    sigmas: Sequence[float] = (0.25, 0.5, 0.75),
    seed: int = 0,
) -> list[B]:
    """Deterministic evaluation batches: each one-sample conditioning at each fixed σ, with noise
    keyed by (seed, sample index): the same batches on every call.

    Args:
        assemble: ``(cond, keys) → batch`` of the model, without dropout (:meth:`Draws.without_dropout`).
    """
    out = []
    for i, cond in enumerate(conds):
        batch = assemble(cond, (seed, -1, i))
        out += [attrs.evolve(batch, sigmas=torch.full_like(batch.sigmas, s)) for s in sigmas]
    return out
