"""A model's cache as a data path: the ``cache`` command fills it, and training reads from it.

A model describes its cache with a :class:`CachePath` (its entries, how to check, fill, read and
collate them); the functions here are the same for every model: fill a rank's share with a
progress bar, and give training a :class:`~qflux.train.batch.DataPath` over the entries, computing the
missing or corrupt ones first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch
from tqdm import tqdm

from qflux.config.devices import component_devices
from qflux.config.schema import RecipeConfig
from qflux.data.pairs import PairRule, PairSample
from qflux.train.batch import Conditioning, DataPath, with_mask
from qflux.train.cache import CacheReport, EntryDataset, Job, entry_problems, fill_entries
from qflux.train.distributed import World, any_rank, barrier, init_world
from qflux.train.run import Run, dataset_samples, quiet_unless


def fixed_prompts(preserve_prompt: str | None) -> tuple[str, ...]:
    """The prompts every sample of a model with image-free prompt embeddings reads: the empty one (caption
    dropout, CFG) and ``train.preserve_prompt``, when set."""
    return ("",) if preserve_prompt is None else ("", preserve_prompt)


@attrs.frozen(eq=False)
class CachePath:
    """A model's cache, bound to one model folder, its settings and the cache root."""

    entries: Callable[[Sequence[PairSample]], list[Any]]
    """Each sample's entries (by content)."""
    verify: Callable[[list[Any]], list[str]]
    """Problems of the entries training would read."""
    fill: Callable[[Any, list[PairSample], Callable[[list[Job]], Any]], CacheReport]
    """``fill(models, samples, progress)`` computes what is missing."""
    dataset: Callable[[list[Any]], Any]
    """A map-style dataset over samples' entries."""
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    conditioning: Callable[[dict[str, Any]], Conditioning]
    empty: Callable[[], Mapping[str, torch.Tensor] | None]
    """Reads the empty prompt's tensors (None: each sample's conditioning carries its own)."""
    preserve: Callable[[], Mapping[str, torch.Tensor] | None] = lambda: None
    """Reads the preserve prompt's tensors (``train.preserve_prompt``; None: none, or each sample's own)."""


def module_cache(
    module: Any,
    spec: Any,
    root: Path,
    conditioning: Callable[[dict[str, Any]], Conditioning],
    empty: Callable[[], Mapping[str, torch.Tensor] | None],
    preserve: Callable[[], Mapping[str, torch.Tensor] | None] = lambda: None,
) -> CachePath:
    """The :class:`CachePath` of a model's cache module for ``spec`` under ``root``.

    The module defines ``sample_entries(spec, root, samples)`` (a record per sample whose ``all()``
    lists the entries it reads), ``empty_entries(spec, root)`` (the entries every sample reads: the
    empty prompt's and the preserve prompt's), ``jobs(models, spec, root, samples)`` (every entry the
    samples need, with how to compute it), ``read_sample(entries)`` and ``collate_cached(items)``.
    """

    def verify(entries: list[Any]) -> list[str]:
        return entry_problems([*(e for se in entries for e in se.all()), *module.empty_entries(spec, root)])

    def fill_missing(models: Any, samples: list[PairSample], progress: Callable[[list[Job]], Any]) -> CacheReport:
        return fill_entries(module.jobs(models, spec, root, samples), progress=progress)

    return CachePath(
        entries=partial(module.sample_entries, spec, root),
        verify=verify,
        fill=fill_missing,
        dataset=lambda entries: EntryDataset(entries, module.read_sample),
        collate=module.collate_cached,
        conditioning=conditioning,
        empty=empty,
        preserve=preserve,
    )


def fill(cache: CachePath, models: Any, samples: list[PairSample], world: World, cache_dir: str) -> CacheReport:
    """Compute this rank's share (every world-th sample) of the entries ``samples`` need, with a
    progress bar over the distinct entries; every rank waits for the others; rank 0 says what it did."""

    def progress(jobs: list[Job]) -> Any:
        return tqdm(jobs, desc="cache", unit="entry", disable=not world.is_main)

    report = cache.fill(models, samples[world.rank :: world.size], progress)
    barrier(world)  # every entry exists before any rank reads one
    for reason in report.replaced:
        print(f"recomputed corrupt entry: {reason}")
    share = f" (rank 0's share of {world.size})" if world.size > 1 else ""
    print(f"cache '{cache_dir}': {report.computed} entries computed, {report.reused} reused{share}")
    return report


def cached_data(cache: CachePath, run: Run, cache_dir: str, load_encoders: Callable[[], Any]) -> DataPath:
    """Training's data path through the cache, for the run's training and validation samples;
    entries missing or corrupt are computed first, by all ranks together, with the encoders that
    ``load_encoders`` loads (and that are freed before the transformer loads)."""
    world, device = run.world, run.device
    samples = run.samples + (run.held_out.samples if run.held_out else [])
    entries = cache.entries(samples)
    problems = cache.verify(entries)
    if world.size > 1 and any_rank(bool(problems), device) and not problems:
        problems = ["another rank found entries missing"]  # fill together: fill() has a barrier
    if problems:
        print(f"cache '{cache_dir}': {len(problems)} entries missing or corrupt (first: {problems[0]}); computing them")
        fill(cache, load_encoders(), samples, world, cache_dir)
    known = dict(zip(samples, entries, strict=True))  # each image file is hashed once

    def make_dataset(chosen: list[PairSample]) -> Any:
        return cache.dataset([known[s] if s in known else cache.entries([s])[0] for s in chosen])

    return DataPath(make_dataset, cache.collate, with_mask(cache.conditioning), cache.empty(), cache.preserve())


def cache_command(
    cfg: RecipeConfig, folder: Path, rule: PairRule, cache: CachePath, load_encoders: Callable[[], Any]
) -> CacheReport:
    """The ``cache`` command: the dataset of ``folder``'s model checked, then under torchrun each rank
    fills every world-th sample (ranks other than 0 print nothing); returns rank 0's counts."""
    world = init_world(component_devices(cfg.devices)["vae"].type)
    with quiet_unless(world.is_main):
        return fill(cache, load_encoders(), dataset_samples(cfg, folder, rule), world, cfg.cache.cache_dir)
