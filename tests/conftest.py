"""Shared fixtures: the tiny FLUX.1 Kontext model (built once per session) and hypothesis profiles."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Built-in assets go to a throwaway folder, never the user's ~/.cache; the hub is never contacted.
os.environ.setdefault("QFLUX_HOME", tempfile.mkdtemp(prefix="qflux-test-home-"))
os.environ["HF_HUB_OFFLINE"] = "1"

# Under pytest-xdist (the suite runs on 2 workers) each worker takes one core: torch's own threads would
# make the two workers fight over both cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile("qflux", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("qflux")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX.1 Kontext folder in the diffusers layout."""
    from qflux.models.flux_kontext.tiny import build_flux_kontext

    return build_flux_kontext(tmp_path_factory.mktemp("tiny-flux-kontext"), seed=0)


@pytest.fixture(scope="session")
def flux_pipe(tiny_flux_dir: Path):
    """The diffusers reference pipeline on the tiny model, float32."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(tiny_flux_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def flux_models(tiny_flux_dir: Path):
    """qflux's own loading of the same folder, float32 (do not inject adapters into it)."""
    from qflux.models.flux_kontext.loaders import load_flux_kontext

    return load_flux_kontext(tiny_flux_dir, torch.float32)


@pytest.fixture(scope="session", autouse=True)
def _fake_steps_untraced():  # type: ignore[no-untyped-def]
    """The planner's steps on fake tensors (``qflux.memory.measure.measure_step``) make millions of Python calls
    inside torch's fake-tensor dispatch, and the coverage tracer, called on each, makes them about twice as slow.
    They run with coverage paused: the qflux code they run (each model's loss, the train step) is covered by the
    real steps of other tests, and the planner's own lines around them stay traced."""
    try:
        import coverage
    except ImportError:
        yield
        return
    cov = coverage.Coverage.current()
    if cov is None:
        yield
        return
    from qflux.memory import encode, measure, planner

    real = measure.measure_step

    def untraced(*args, **kwargs):  # type: ignore[no-untyped-def]
        cov.stop()
        try:
            return real(*args, **kwargs)
        finally:
            cov.start()

    with pytest.MonkeyPatch.context() as mp:
        for module in (measure, planner, encode):
            mp.setattr(module, "measure_step", untraced)
        yield
