"""Each model.quantize variant trains on CPU (the held-out loss of the synthetic task falls) and its
LoRA, saved in the usual diffusers format, loads into the bf16 pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qflux.config.parse import load_config
from qflux.data.pairs import scan_pairs
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.flux_kontext.loaders import load_flux_kontext
from qflux.models.flux_kontext.loss import make_loss_fn
from qflux.models.qwen_image_edit.config import QwenImageEditConfig
from qflux.train.builtin import resolve_dataset_path
from qflux.train.state import evaluate_loss
from tests.flux_kontext_batches import fixed_eval_batches


@pytest.mark.parametrize("mode", ["fp8", "nf4", "fp4"])
def test_variant_trains_and_its_lora_loads_in_the_bf16_pipeline(
    mode: str, tiny_flux_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from diffusers import FluxKontextPipeline

    from recipes.flux_kontext_lora import train as run

    out = tmp_path_factory.mktemp(f"run-{mode}")
    cfg = load_config(
        FluxKontextConfig,
        None,
        {
            "model.pretrained_model_name_or_path": str(tiny_flux_dir),
            "model.quantize": mode,
            "model.quantize_text_encoders": True,
            "model.max_sequence_length": 32,
            "train.max_train_steps": 40,
            "cache.use_cache": True,
            "cache.cache_dir": str(out / "cache"),
            "logging.output_dir": str(out),
            "logging.write_sample": False,
            "logging.report_to": "none",
        },
    )
    result = run(cfg)
    held = scan_pairs(resolve_dataset_path("builtin:synthetic", heldout=True), None, multiple=16)
    batches = fixed_eval_batches(cfg, load_flux_kontext(tiny_flux_dir, torch.bfloat16), held)
    loss_fn = make_loss_fn(result.models.transformer, guidance_scale=2.5)
    before = evaluate_loss(loss_fn, result.initial_lora, batches).item()
    after = evaluate_loss(loss_fn, result.state.lora, batches).item()
    print(f"{mode}: held-out loss {before:.4f} -> {after:.4f}")
    assert after < 0.95 * before
    pipe = FluxKontextPipeline.from_pretrained(tiny_flux_dir, dtype=torch.bfloat16)
    pipe.load_lora_weights(out)  # the same diffusers file as a bf16 run writes


def test_qwen_variant_with_quantized_text_encoder(tmp_path: Path) -> None:
    from diffusers import QwenImageEditPipeline

    from qflux.models.qwen_image_edit.processor import load_qwen_processor
    from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
    from qflux.weights.quantize import count_layers, is_quantized
    from recipes.qwen_image_edit_lora import train as run

    # a text encoder 64 wide, so that its MLPs fit bitsandbytes' 4-bit kernels on every CPU
    wide = {"text": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2}}
    model = build_qwen_image_edit(tmp_path / "model", seed=0, overrides=wide)
    overrides = {
        "model.pretrained_model_name_or_path": str(model),
        "model.quantize": "nf4",
        "model.quantize_text_encoders": True,
        "train.max_train_steps": 3,
        "logging.output_dir": str(tmp_path / "out"),
        "logging.write_sample": False,
        "logging.report_to": "none",
    }
    result = run(load_config(QwenImageEditConfig, None, overrides))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert is_quantized(result.models.text_encoder.model.language_model.layers[0].mlp.up_proj)
    assert count_layers(result.models.text_encoder, "nf4").kept > 0  # the 16-wide vision tower stays bf16
    pipe = QwenImageEditPipeline.from_pretrained(model, processor=load_qwen_processor(model / "processor"))
    pipe.load_lora_weights(tmp_path / "out")


def test_flux2_dev_caches_with_its_mistral_in_nf4_and_trains(tmp_path: Path) -> None:
    """The 24 GB config's way: Mistral Small 3.1 stored in nf4 while it fills the cache, then training from the
    cache alone (a tiny [dev] whose text model is 64 wide, so its layers fit bitsandbytes' 4-bit kernels)."""
    from qflux.config.parse import load_config as load
    from qflux.models.flux2.config import Flux2DevConfig
    from qflux.models.flux2.tiny import build_flux2_dev
    from qflux.weights.quantize import count_layers
    from recipes.flux2_dev_lora import cache, train

    wide = {"text": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2}}
    model = build_flux2_dev(tmp_path / "model", seed=3, overrides=wide)
    overrides = {"model.pretrained_model_name_or_path": str(model), "model.quantize": "nf4",
                 "model.quantize_text_encoders": True, "model.max_sequence_length": 80, "train.max_train_steps": 2,
                 "cache.use_cache": True, "cache.cache_dir": str(tmp_path / "cache"),
                 "logging.output_dir": str(tmp_path / "out"), "logging.write_sample": False,
                 "logging.report_to": "none"}  # fmt: skip
    cfg = load(Flux2DevConfig, None, overrides)
    report = cache(cfg)
    assert report.computed > 0
    from recipes.flux2 import DEV_SPEC, _load

    encoders = _load(DEV_SPEC, cfg, model, ("text_encoder",))
    assert count_layers(encoders.text_encoder, "nf4").quantized > 0
    result = train(cfg)
    assert result.models.text_encoder is None  # cached training never loads the encoder
    assert all(torch.isfinite(torch.tensor(result.losses)))
