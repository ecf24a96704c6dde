"""The order of batches and the stream that serves them: same-size batches whose order is a function
of (seed, epoch), sliced per data-parallel rank, resumable from a saved position.

The whole state of the stream is its position (epoch, batch index): the batches of an epoch are
recomputed from (seed, epoch), so a resumed run skips to the position without reading anything.
Images are decoded and resized by a ``torch.utils.data.DataLoader``'s worker processes
(``data.num_workers``), which prefetch ahead of the step (see docs/architecture/data.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader

from qflux.config.errors import QfluxError
from qflux.data.dataset import collate_pairs
from qflux.data.pairs import PairSample


def epoch_batches(
    samples: Sequence[PairSample], batch_size: int, *, seed: int, epoch: int, shuffle: bool, drop_last: bool = False
) -> list[list[int]]:
    """Group sample indices into batches of equal (control sizes, target size), i.e. of one bucket; the
    order depends only on (seed, epoch). Batches are full except each size group's last one, which
    ``drop_last`` drops when it is short.
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
        stop = len(idx) - len(idx) % batch_size if drop_last else len(idx)
        batches += [idx[j : j + batch_size] for j in range(0, stop, batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def check_batches(samples: Sequence[PairSample], batch_size: int, world: int, *, drop_last: bool) -> None:
    """Refuse a dataset that would give no batch at all (every size group smaller than the global batch
    with ``drop_last``, or than the number of ranks)."""
    batches = epoch_batches(samples, batch_size * world, seed=0, epoch=0, shuffle=False, drop_last=drop_last)
    if not [b for b in batches if len(b) >= world]:
        raise QfluxError(
            f"no bucket holds {batch_size * world if drop_last else world} pairs, so there is no batch to "
            f"train on (data.batch_size: {batch_size}, {world} rank(s), data.drop_last: {str(drop_last).lower()}); "
            "lower data.batch_size or set data.drop_last: false"
        )


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
    drop_last: bool = False,
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
        drop_last: drop each size group's short last (global) batch.

    Yields:
        ((epoch, batch index) of the *next* batch, batch) — the position to save after using it.
    """

    rank, world = shard
    epoch, first = start
    while True:
        batches = epoch_batches(
            samples, batch_size * world, seed=seed, epoch=epoch, shuffle=shuffle, drop_last=drop_last
        )
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
