"""The order of batches and the stream that serves them: same-size batches whose order is a function
of (seed, epoch), sliced per data-parallel rank, resumable from a saved position."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from qflux.data import PairSample, collate_pairs


def epoch_batches(
    samples: Sequence[PairSample], batch_size: int, *, seed: int, epoch: int, shuffle: bool
) -> list[list[int]]:
    """Group sample indices into batches of equal (control sizes, target size); the order depends only on
    (seed, epoch). The last batch of a size group may be smaller.
    """
    rng = random.Random(f"{seed}/{epoch}")
    groups: dict[tuple[tuple[tuple[int, int], ...], tuple[int, int]], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.control_sizes, s.target_size), []).append(i)
    batches = []
    for key in sorted(groups):
        idx = groups[key]
        if shuffle:
            rng.shuffle(idx)
        batches += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def batch_stream(
    dataset: Any,
    samples: Sequence[PairSample],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool,
    num_workers: int,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate_pairs,
    start: tuple[int, int] = (0, 0),
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
    """Endless stream of collated same-size batches of ``dataset``, epoch after epoch.

    Args:
        dataset: map-style, indexed like ``samples`` (images, or cached tensors).
        samples: give the sizes that batches are grouped by.
        start: (epoch, batch index) of the first batch; a resumed run passes the saved position.
        shard: (rank, world size). With several ranks the stream walks global batches of
            ``batch_size × world`` (the order one process with that batch size would see) and
            yields this rank's contiguous slice; a global batch too small to give every rank a
            sample (the tail of a size group) is skipped by all ranks. Each batch carries
            ``offset`` (its first sample's index in the global batch) and ``global_size``.

    Yields:
        ((epoch, batch index) of the *next* batch, batch) — the position to save after using it.
    """
    from torch.utils.data import DataLoader

    rank, world = shard
    epoch, first = start
    while True:
        batches = epoch_batches(samples, batch_size * world, seed=seed, epoch=epoch, shuffle=shuffle)
        if world > 1:
            batches = [b for b in batches if len(b) >= world]
        batches = batches[first:]
        sizes = [len(b) for b in batches]
        slices = [_slice(len(b), rank, world) for b in batches]
        mine = [b[o : o + n] for b, (o, n) in zip(batches, slices, strict=True)]
        loader: DataLoader[Any] = DataLoader(
            dataset, batch_sampler=mine, num_workers=num_workers, collate_fn=collate_fn
        )
        for i, batch in enumerate(loader, start=first + 1):
            batch["offset"], batch["global_size"] = slices[i - first - 1][0], sizes[i - first - 1]
            yield (epoch, i), batch
        epoch, first = epoch + 1, 0


def _slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """(offset, count) of rank's contiguous share of n samples (the first n mod world take one more)."""
    base, extra = divmod(n, world)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)
