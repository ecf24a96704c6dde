"""``train.preserve: base`` and ``train.preserve_prompt`` through the recipes: every family trains with them (and not
the LoRA it trains without), cached training equals uncached and a resumed run equals a straight one bit for bit,
block swap trains the same LoRA, ``plan`` counts the extra forwards, and the settings they cannot apply are refused
with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config
from qflux.memory.command import plan_inputs
from qflux.memory.planner import Setting, estimate
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.weights.shapes import shipped_configs
from recipes import flux2_klein_lora, flux_kontext_lora, qwen_image_edit_lora
from recipes.flux_kontext_lora import train as flux_train
from tests.flux_kontext_batches import tiny_args
from tests.recipes.test_loss_mask import _edited_pairs

KEEP = ["--train.loss_mask=auto", "--train.preserve=base"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pairs whose edit paints the top-left quarter red: the rest is for preservation to keep."""
    return _edited_pairs(tmp_path_factory.mktemp("data") / "pairs", n=4)


@pytest.mark.parametrize("recipe", [flux_kontext_lora, qwen_image_edit_lora, flux2_klein_lora])
def test_each_family_trains_with_preservation_and_routed(recipe, data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each family trains with ``train.preserve: base`` and with ``train.route: tread`` (every block but the first
    routed), each to another finite LoRA than the plain run's."""
    loras = {}
    for name, more in (("plain", []), ("kept", ["--train.preserve=base", "--train.preserve_weight=4"]),
                       ("routed", ["--train.route=tread", "--train.route_blocks=[1, -1]"])):  # fmt: skip
        out = tmp_path / name
        recipe.main(["train", f"--data.dataset_path={data}", f"--logging.output_dir={out}", "--train.max_train_steps=3",
                     "--train.loss_mask=auto", "--logging.write_sample=false", "--model.dtype=float32", *more,
                     *tiny_args(recipe, data=False)])  # fmt: skip
        loras[name] = load_file(out / "pytorch_lora_weights.safetensors")
    for other in ("kept", "routed"):
        assert loras["plain"].keys() == loras[other].keys()
        assert all(torch.isfinite(t).all() for t in loras[other].values())
        assert any(not torch.equal(loras["plain"][k], loras[other][k]) for k in loras["plain"])


@pytest.mark.parametrize("recipe", [flux_kontext_lora, qwen_image_edit_lora, flux2_klein_lora])
def test_each_family_trains_with_a_preserve_prompt_cached_or_not(recipe, data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    loras = {}
    for name, more in (("plain", []), ("kept", ["--train.preserve_prompt=a photo"]),
                       ("cached", ["--train.preserve_prompt=a photo", "--cache.use_cache=true"])):  # fmt: skip
        out = tmp_path / name
        recipe.main(["train", f"--data.dataset_path={data}", f"--logging.output_dir={out}", "--train.max_train_steps=2",
                     "--logging.write_sample=false", "--model.dtype=float32", f"--cache.cache_dir={tmp_path / 'c'}",
                     *more, *tiny_args(recipe, data=False)])  # fmt: skip
        loras[name] = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(loras["plain"][k], loras["kept"][k]) for k in loras["plain"])
    assert all(torch.equal(loras["kept"][k], loras["cached"][k]) for k in loras["kept"])
    assert len(list((tmp_path / "c").rglob("*.safetensors"))) > 0


def _cfg(model: Path, data: Path, out: Path, steps: int, **more: object) -> FluxKontextConfig:
    return load_config(
        FluxKontextConfig,
        None,
        {"model.pretrained_model_name_or_path": str(model), "model.dtype": "float32", "model.max_sequence_length": 8,
         "data.dataset_path": str(data), "train.max_train_steps": steps, "train.checkpointing_steps": 2,
         "train.loss_mask": "auto", "train.preserve": "base", "train.loss": "pseudo_huber", "train.huber_c": 0.5,
         "train.preserve_prompt": "a photo",
         "logging.output_dir": str(out), "logging.write_sample": False, "logging.report_to": "none",
         "cache.cache_dir": str(out.parent / "cache"), **more},
    )  # fmt: skip


def test_cached_resumed_and_swapped_runs_train_the_same_lora(tiny_flux_dir: Path, data: Path, tmp_path: Path) -> None:
    straight = flux_train(_cfg(tiny_flux_dir, data, tmp_path / "straight", 4))
    cached = flux_train(_cfg(tiny_flux_dir, data, tmp_path / "cached", 4, **{"cache.use_cache": True}))
    flux_train(_cfg(tiny_flux_dir, data, tmp_path / "resumed", 2))
    resumed = flux_train(_cfg(tiny_flux_dir, data, tmp_path / "resumed", 4, resume_from_checkpoint="latest"))
    swapped = flux_train(_cfg(tiny_flux_dir, data, tmp_path / "swapped", 4, **{"train.blocks_to_swap": 2}))
    for other in (cached, resumed, swapped):
        assert other.losses == straight.losses
        assert all(torch.equal(other.state.lora[k], straight.state.lora[k]) for k in straight.state.lora)


def test_plan_counts_the_base_models_forward() -> None:
    """FLUX.1 Kontext at full size in bf16, without checkpointing: the base forward runs while the LoRA forward's
    activations are held, so the peak grows by its transient tensors; a preserve prompt adds a second forward with
    backward, whose activations are held too; the weights and state do not change."""
    rows = {}
    settings = {"none": {}, "base": {"train.preserve": "base"}, "prompt": {"train.preserve_prompt": "a photo"}}
    for preserve, more in settings.items():
        cfg = load_config(FluxKontextConfig, "recipes/configs/flux_kontext_bf16.yaml",
                          {"train.loss_mask": "auto", **more})  # fmt: skip
        target = flux_kontext_lora._plan_target(cfg)
        configs = {c: shipped_configs("black-forest-labs/FLUX.1-Kontext-dev")[c] for c in target.components}
        inputs = plan_inputs(cfg, target, configs, 1)
        rows[preserve] = estimate(target.model, configs, inputs, Setting("none", False, 0), dtype=torch.bfloat16,
                                  lora=cfg.model.lora)  # fmt: skip
    kept, prompt, plain = rows["base"], rows["prompt"], rows["none"]
    assert kept.weights == plain.weights == prompt.weights and kept.state == plain.state == prompt.state
    assert plain.peak < kept.peak < prompt.peak


def test_what_preservation_cannot_apply_is_refused() -> None:
    for settings, fix in (
        ({"train.loss_mask": "none", "train.preserve": "base"}, "set train.loss_mask: auto (or masks)"),
        (
            {"train.preserve_weight": 2.0},
            "train.preserve_weight is read only by train.preserve: base or train.preserve_prompt",
        ),
        ({"train.huber_c": 1.0}, "train.huber_c is read only by train.loss: huber or pseudo_huber"),
    ):
        with pytest.raises(QfluxError) as info:
            load_config(FluxKontextConfig, None, settings)
        assert fix in str(info.value)
