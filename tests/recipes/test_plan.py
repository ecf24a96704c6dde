"""The ``plan`` command on the published full-size shapes (nothing downloaded, no GPU): FLUX.1 Kontext
in bf16 without checkpointing does not fit 24 GiB, nf4 with checkpointing fits 16 GiB, swapping 30
blocks takes their weights off the device; on the tiny models it plans what they are; errors name
the fix. Full-size steps on fake tensors take seconds each and are measured once per process."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch

from qflux.config.parse import load_config
from qflux.memory.command import fit_warning, plan_inputs
from qflux.memory.measure import GIB
from qflux.memory.planner import Setting, block_weights, estimate
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.qwen_image_edit.config import QwenImageEditConfig
from qflux.weights.shapes import shipped_configs, shipped_ids
from recipes import flux2_klein_lora, flux_kontext_lora, qwen_image_edit_lora

BF16 = "recipes/configs/flux_kontext_bf16.yaml"


def _plan_json(recipe, capsys, argv: list[str]) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
    try:
        recipe.main(["plan", *argv, "--json"])
        status = 0
    except SystemExit as e:
        status = int(e.code or 0)
    return status, json.loads(capsys.readouterr().out)


def test_full_size_kontext_in_bf16_without_checkpointing_does_not_fit_24(capsys) -> None:
    status, out = _plan_json(flux_kontext_lora, capsys, [f"--config={BF16}", "--train.gradient_checkpointing=false",
                                                         "--vram=24"])  # fmt: skip
    assert status == 3 and out["fits"] is False and 30 <= out["peak_gib"] <= 120
    b = out["breakdown"]
    assert b["weights"] == pytest.approx(22.2, abs=0.1)  # 11.9 B parameters in bf16
    assert out["cheapest_change"] and "--model.quantize" in out["cheapest_change"]
    fitting = [r for r in out["alternatives"] if r["fits"]]
    assert fitting and all(r["peak_gib"] <= 24 for r in fitting)


def test_full_size_kontext_in_nf4_with_checkpointing_fits_16(capsys) -> None:
    status, out = _plan_json(flux_kontext_lora, capsys, [f"--config={BF16}", "--model.quantize=nf4", "--vram=16"])
    assert status == 0 and out["fits"] is True and out["peak_gib"] <= 12  # the target for nf4
    assert out["cheapest_change"] is None


def test_the_shipped_fp8_and_fp4_configs_plan_offline(capsys) -> None:
    """Their pre-quantized hub checkpoints are FLUX.1-Kontext-dev re-stored: the same shapes."""
    for name in ("fp8", "fp4"):
        status, out = _plan_json(flux_kontext_lora, capsys, [f"--config=recipes/configs/flux_kontext_{name}.yaml",
                                                             "--vram=18"])  # fmt: skip
        assert status == 0 and out["peak_gib"] <= 18


def test_the_published_klein_4b_plans_offline_and_both_shapes_have_their_sizes(capsys) -> None:
    """FLUX.2 [klein] 4B from qflux's shipped shapes (nothing downloaded), one reference at 1024²; the
    4B and 9B shapes build to transformers of 3.9 B and 9.1 B parameters."""
    from diffusers import Flux2Transformer2DModel

    status, out = _plan_json(flux2_klein_lora, capsys, ["--model.pretrained_model_name_or_path=black-forest-labs/"
                                                        "FLUX.2-klein-4B", "--vram=32", "--controls=1",
                                                        "--train.gradient_checkpointing=true"])  # fmt: skip
    assert status == 0 and out["fits"] is True and 8 <= out["peak_gib"] <= 32
    for name, billions in (("4B", 3.88), ("9B", 9.08)):
        with torch.device("meta"):
            tr = Flux2Transformer2DModel.from_config(
                shipped_configs(f"black-forest-labs/FLUX.2-klein-{name}")["transformer"]
            )
        assert sum(p.numel() for p in tr.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_swapping_30_blocks_lowers_the_estimate_by_their_weights() -> None:
    cfg = load_config(FluxKontextConfig, BF16, {})
    target = flux_kontext_lora._plan_target(cfg)
    configs = {c: shipped_configs("black-forest-labs/FLUX.1-Kontext-dev")[c] for c in target.components}
    inputs = plan_inputs(cfg, target, configs, 1)
    kept, swapped = (
        estimate(target.model, configs, inputs, Setting("none", True, n), dtype=torch.bfloat16, lora=cfg.model.lora)
        for n in (0, 30)
    )
    blocks = block_weights(target.model, configs["transformer"], torch.bfloat16, "none")
    assert len(blocks) == 57
    moved = sum(blocks[-30:])
    assert kept.weights - swapped.weights == moved  # exactly the 30 blocks' frozen linears
    # the peak also holds the blocks in flight on the device (at most the two largest of them)
    in_flight = kept.peak - swapped.peak
    assert moved - sum(sorted(blocks[-30:])[-2:]) <= in_flight <= moved
    assert moved / GIB > 7


def test_the_tiny_qwen_model_plans_from_its_folder(capsys, tmp_path: Path) -> None:
    from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit

    path = build_qwen_image_edit(tmp_path / "qwen", seed=0, variant="edit_plus")
    argv = [f"--model.pretrained_model_name_or_path={path}", "--model.variant=edit_plus", "--vram=2"]
    status, out = _plan_json(qwen_image_edit_lora, capsys, [*argv, "--controls=3"])
    assert status == 0 and out["breakdown"]["weights"] < 0.01 and out["breakdown"]["allowance"] == 1.0
    qwen_image_edit_lora.main(["plan", *argv, "--controls=1"])
    text = capsys.readouterr().out
    assert str(path) in text and "1 control image(s)" in text and "fits:" in text


def test_a_hub_id_it_cannot_read_names_the_shipped_ones(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        flux_kontext_lora.main(["plan", "--model.pretrained_model_name_or_path=someone/unknown-model", "--vram=24"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "someone/unknown-model" in err
    assert all(i in err for i in shipped_ids()) and "config.json" in err


def test_plan_without_vram_on_a_machine_without_cuda_asks_for_it(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device to read the size from")
    with pytest.raises(SystemExit) as info:
        flux_kontext_lora.main(["plan", f"--config={BF16}"])
    assert info.value.code == 2 and "--vram=GiB" in capsys.readouterr().err


def test_no_warning_before_a_cpu_run(tiny_flux_dir: Path) -> None:
    cfg = load_config(QwenImageEditConfig, None, {})
    assert fit_warning(cfg, qwen_image_edit_lora._plan_target(cfg), tiny_flux_dir, torch.device("cpu")) is None


def test_plan_sizes_controls_by_the_control_cap() -> None:
    """data.control_max_pixels (and a pipeline's own cap under control_size: model) shrinks the planned controls."""
    for recipe, cls, name in ((flux_kontext_lora, FluxKontextConfig, "black-forest-labs/FLUX.1-Kontext-dev"),
                              (qwen_image_edit_lora, QwenImageEditConfig, "Qwen/Qwen-Image-Edit")):  # fmt: skip
        configs = shipped_configs(name)
        for more, side in (({}, 1024), ({"data.control_max_pixels": 512 * 512}, 512)):
            cfg = load_config(cls, None, {"data.max_pixels": 1024 * 1024, **more})
            inputs = plan_inputs(cfg, recipe._plan_target(cfg), configs, 1)
            assert inputs.target == (1024, 1024) and inputs.controls == ((side, side),)
    # Qwen's pipeline sizes a control at ~1024² whatever the training area: so does the plan
    cfg = load_config(QwenImageEditConfig, None, {"data.max_pixels": 2048 * 2048})
    inputs = plan_inputs(cfg, qwen_image_edit_lora._plan_target(cfg), shipped_configs("Qwen/Qwen-Image-Edit"), 1)
    assert inputs.target == (2048, 2048) and inputs.controls == ((1024, 1024),)


@pytest.mark.parametrize(("card", "train_peak"), [(24, (20, 24)), (48, (38, 48))])
def test_the_flux2_dev_configs_fit_their_cards_and_so_does_the_cache_step(
    card: int, train_peak: tuple[int, int]
) -> None:
    """FLUX.2 [dev] (32B) at 1024² with one 1024² reference, batch 1, checkpointing, from the cache: nf4 with 24
    blocks swapped fits 24 GiB, fp8 fits 48 GiB; each config's cache step (Mistral Small 3.1, 24B, stored as the
    transformer is, beside the VAE) fits its card, and would not with the encoder in bf16 (45 GiB of weights)."""
    from qflux.memory.command import cache_step
    from qflux.models.flux2.config import Flux2DevConfig
    from recipes import flux2_dev_lora

    cfg = load_config(Flux2DevConfig, f"recipes/configs/flux2_dev_{card}gb.yaml", {})
    target = flux2_dev_lora._plan_target(cfg)
    configs = {c: shipped_configs("black-forest-labs/FLUX.2-dev")[c] for c in target.components}
    train = cfg.train
    setting = Setting(cfg.model.quantize, train.gradient_checkpointing, train.blocks_to_swap, cfg.cache.use_cache)
    inputs = plan_inputs(cfg, target, configs, 1)
    assert inputs.target == inputs.controls[0] == (1024, 1024) and inputs.text_tokens == 512
    assert (setting.checkpointing, setting.cached, inputs.batch_size) == (True, True, 1)
    step = estimate(target.model, configs, inputs, setting, dtype=torch.bfloat16, lora=cfg.model.lora)
    assert train_peak[0] * GIB <= step.peak <= train_peak[1] * GIB
    encoding = cache_step(cfg, target, configs, inputs)
    assert encoding.peak <= card * GIB and encoding.weights["text_encoder"] > 10 * GIB
    bf16 = cache_step(attrs.evolve(cfg, model=attrs.evolve(cfg.model, quantize_text_encoders=False)), target,
                      configs, inputs)  # fmt: skip
    assert bf16.weights["text_encoder"] > 44 * GIB and bf16.peak > 44 * GIB
