"""``train.route: tread`` through the FLUX.1 recipe: a routed run resumes, caches, swaps blocks and checkpoints to
the same LoRA bit for bit, a route ratio of 0 is the unrouted run, and ``plan`` counts the routed blocks' smaller
activations. Every family's routed run: tests/recipes/test_preserve.py; 2 ranks against 1 process:
tests/recipes/test_distributed.py (Qwen-Image-Edit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qflux.config.parse import load_config
from qflux.memory.command import plan_inputs
from qflux.memory.planner import Setting, estimate
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.weights.shapes import shipped_configs
from recipes import flux_kontext_lora
from recipes.flux_kontext_lora import train as flux_train
from tests.recipes.test_loss_mask import _edited_pairs


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pairs whose edit paints the top-left quarter red (the auto mask finds it)."""
    return _edited_pairs(tmp_path_factory.mktemp("data") / "pairs", n=4)


def _cfg(model: Path, data: Path, out: Path, steps: int, **more: object) -> FluxKontextConfig:
    return load_config(
        FluxKontextConfig,
        None,
        {"model.pretrained_model_name_or_path": str(model), "model.dtype": "float32", "model.max_sequence_length": 8,
         "data.dataset_path": str(data), "data.batch_size": 2, "train.max_train_steps": steps,
         "train.checkpointing_steps": 2, "train.loss_mask": "auto", "train.preserve": "base",
         "train.route": "tread",
         "logging.output_dir": str(out), "logging.write_sample": False, "logging.report_to": "none",
         "cache.cache_dir": str(out.parent / "cache"), **more},
    )  # fmt: skip


def test_a_routed_run_resumes_caches_swaps_and_checkpoints_to_the_same_lora(
    tiny_flux_dir: Path, data: Path, tmp_path: Path
) -> None:
    straight = flux_train(_cfg(tiny_flux_dir, data, tmp_path / "straight", 4))
    flux_train(_cfg(tiny_flux_dir, data, tmp_path / "resumed", 2))
    resumed = flux_train(_cfg(tiny_flux_dir, data, tmp_path / "resumed", 4, resume_from_checkpoint="latest"))
    other = flux_train(_cfg(tiny_flux_dir, data, tmp_path / "other", 4, **{"cache.use_cache": True,
                       "train.blocks_to_swap": 2, "train.gradient_checkpointing": True}))  # fmt: skip
    for run in (resumed, other):
        assert run.losses == straight.losses
        assert all(torch.equal(run.state.lora[k], straight.state.lora[k]) for k in straight.state.lora)
    unrouted = flux_train(_cfg(tiny_flux_dir, data, tmp_path / "unrouted", 2, **{"train.route": "none"}))
    zero = flux_train(_cfg(tiny_flux_dir, data, tmp_path / "zero", 2, **{"train.route_ratio": 0.0}))
    assert zero.losses == unrouted.losses != straight.losses[:2]


def test_plan_counts_the_routed_blocks() -> None:
    """FLUX.1 Kontext at full size in bf16 without checkpointing: routing half the target's tokens around blocks
    1..56 of 57 (the default span) holds fewer activations; the weights and state do not change."""
    rows = {}
    for name, more in (("none", {}), ("tread", {"train.route": "tread"})):
        cfg = load_config(FluxKontextConfig, "recipes/configs/flux_kontext_bf16.yaml", more)
        target = flux_kontext_lora._plan_target(cfg)
        configs = {c: shipped_configs("black-forest-labs/FLUX.1-Kontext-dev")[c] for c in target.components}
        rows[name] = estimate(target.model, configs, plan_inputs(cfg, target, configs, 1), Setting("none", False, 0),
                              dtype=torch.bfloat16, lora=cfg.model.lora)  # fmt: skip
    plain, routed = rows["none"], rows["tread"]
    assert routed.weights == plain.weights and routed.state == plain.state
    assert routed.activations < 0.85 * plain.activations
