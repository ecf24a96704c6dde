"""Config parsing: defaults, YAML, overrides, unknown keys with suggestions, range checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config, schema_keys, to_dict
from qflux.models.flux2.config import Flux2DevConfig
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.qwen_image_edit.config import QwenImageEditConfig

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_builtin_demo() -> None:
    cfg = load_config(FluxKontextConfig, None, {})  # FLUX.1 Kontext's: the toy model and an edit it was not taught
    assert cfg.model.pretrained_model_name_or_path == "builtin:toy-flux-kontext"
    assert cfg.data.dataset_path == "builtin:toy-invert"
    cfg = load_config(FluxKontextConfig, None, {"data.batch_size": 4})  # a section named keeps its root's defaults
    assert (cfg.data.dataset_path, cfg.data.batch_size) == ("builtin:toy-invert", 4)
    cfg = load_config(QwenImageEditConfig, None, {})  # the others': their tiny model and the synthetic set
    assert cfg.model.pretrained_model_name_or_path == "builtin:tiny-qwen-image-edit"
    assert cfg.data.dataset_path == "builtin:synthetic"


def test_overrides_are_coerced() -> None:
    cfg = load_config(
        FluxKontextConfig,
        None,
        {
            "model.lora.r": "8",
            "train.gradient_checkpointing": "true",
            "optimizer.lr": "1e-4",
            "optimizer.betas": [0.8, 0.9],
            "model.lora.target_modules": ["to_q"],
            "data.max_pixels": "null",
            "train.max_grad_norm": "none",
            "model.lora.init_lora_weights": "false",
        },
    )
    assert cfg.model.lora.r == 8 and cfg.train.gradient_checkpointing is True
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.model.lora.target_modules == ("to_q",)
    assert cfg.data.max_pixels is None and cfg.train.max_grad_norm is None
    assert cfg.model.lora.init_lora_weights is False


def test_unknown_override_suggests_closest() -> None:
    with pytest.raises(
        QfluxError, match=r"unknown option '--train.max_train_step'; did you mean 'train.max_train_steps'"
    ):
        load_config(FluxKontextConfig, None, {"train.max_train_step": 3})


def test_unknown_file_key_names_file_and_closest(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("optimizer:\n  learning_rate: 0.1\n")
    with pytest.raises(
        QfluxError, match=r"c.yaml: unknown config key 'optimizer.learning_rate'; did you mean 'optimizer.lr'"
    ):
        load_config(FluxKontextConfig, f, {})


@pytest.mark.parametrize(
    ("key", "value", "msg"),
    [
        ("data.caption_dropout_rate", 1.5, r"must be in \[0, 1\]"),
        ("model.dtype", "float8", r"must be one of 'bfloat16', 'float16', 'float32'"),
        ("train.max_train_steps", 0, r"must be > 0"),
        ("train.max_train_steps", "many", r"must be an integer"),
        ("optimizer.betas", [0.9], r"list of 2 values"),
        ("lr_scheduler.scheduler_type", "step", r"must be one of"),
        ("model.max_sequence_length", 1024, r"max_sequence_length"),
    ],
)
def test_invalid_values_are_rejected(key: str, value: object, msg: str) -> None:
    with pytest.raises(QfluxError, match=msg):
        load_config(FluxKontextConfig, None, {key: value})


def test_missing_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(QfluxError, match="does not exist"):
        load_config(FluxKontextConfig, tmp_path / "none.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(QfluxError, match="not valid YAML"):
        load_config(FluxKontextConfig, bad, {})
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(QfluxError, match="must hold a mapping"):
        load_config(FluxKontextConfig, listy, {})


@pytest.mark.parametrize(("pattern", "cls"), [("flux_kontext_*.yaml", FluxKontextConfig),
                                              ("qwen_image_edit_*.yaml", QwenImageEditConfig),
                                              ("flux2_dev_*.yaml", Flux2DevConfig)])  # fmt: skip
def test_shipped_configs_load_and_round_trip(tmp_path: Path, pattern: str, cls: type) -> None:
    import yaml

    configs = sorted((ROOT / "recipes" / "configs").glob(pattern))
    assert configs
    for path in configs:
        cfg = load_config(cls, path, {})
        out = tmp_path / path.name
        out.write_text(yaml.safe_dump(to_dict(cfg)))
        assert load_config(cls, out, {}) == cfg


def test_qwen_defaults_are_the_builtin_demo() -> None:
    cfg = load_config(QwenImageEditConfig, None, {})
    assert cfg.model.pretrained_model_name_or_path == "builtin:tiny-qwen-image-edit"
    assert cfg.model.variant == "edit" and cfg.logging.output_dir == "outputs/qwen_image_edit_lora"
    with pytest.raises(QfluxError, match="variant"):
        load_config(QwenImageEditConfig, None, {"model.variant": "plus"})
    with pytest.raises(QfluxError, match="guidance_scale"):  # a FLUX-only key
        load_config(QwenImageEditConfig, None, {"model.guidance_scale": 3.0})


def test_to_dict_is_plain_lists_and_dicts() -> None:
    d = to_dict(FluxKontextConfig())
    assert d["model"]["lora"]["target_modules"] == ["all-linear"]
    assert d["optimizer"]["betas"] == [0.9, 0.999]


def test_plan_contract_keys_exist() -> None:
    keys = set(schema_keys(FluxKontextConfig))
    contract = {
        "model.pretrained_model_name_or_path", "model.dtype", "model.lora.r", "model.lora.lora_alpha",
        "model.lora.init_lora_weights", "model.lora.target_modules", "data.dataset_path", "data.batch_size",
        "data.caption_dropout_rate", "data.prompt_image_dropout_rate", "optimizer.lr", "optimizer.betas",
        "optimizer.weight_decay", "optimizer.eps", "lr_scheduler.scheduler_type", "lr_scheduler.warmup_steps",
        "train.max_train_steps", "train.gradient_accumulation_steps", "train.max_grad_norm",
        "train.gradient_checkpointing", "logging.output_dir", "seed",
    }  # fmt: skip
    assert contract <= keys


def test_devices_are_validated_and_resolved() -> None:
    import torch

    from qflux.config.devices import resolve_device

    with pytest.raises(QfluxError, match=r"must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        load_config(FluxKontextConfig, None, {"devices.transformer": "gpu0"})
    assert resolve_device("cpu", key="train.device") == torch.device("cpu")
    assert resolve_device("auto", key="x").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(QfluxError, match=r"cache.vae_encoder_device is 'cuda:1' but this machine has no CUDA"):
            resolve_device("cuda:1", key="cache.vae_encoder_device")
