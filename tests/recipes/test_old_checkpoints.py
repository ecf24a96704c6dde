"""A checkpoint written before the loop state and the devices section existed (its state.json
without the non-finite streak, its config.yaml in the old schema) resumes; one from another
LoRA shape is refused with the keys that differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config
from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.flux_kontext.config import FluxKontextConfig
from recipes.flux_kontext_lora import train


def _cfg(model: Path, data: Path, out: Path, steps: int, **more: object) -> FluxKontextConfig:
    overrides = {"model.pretrained_model_name_or_path": str(model), "model.max_sequence_length": 8,
                 "data.dataset_path": str(data), "train.max_train_steps": steps, "logging.output_dir": str(out),
                 "logging.write_sample": False, "logging.report_to": "none", **more}  # fmt: skip
    return load_config(FluxKontextConfig, None, overrides)


def _age(checkpoint: Path) -> None:
    """Rewrite a checkpoint as the earlier qflux wrote it."""
    meta = json.loads((checkpoint / "state.json").read_text())
    del meta["nonfinite_streak"], meta["nonfinite_worst"]
    (checkpoint / "state.json").write_text(json.dumps(meta))
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    devices = config.pop("devices")
    config["model"].pop("guidance_scale")
    config["train"] |= {"device": devices["transformer"], "guidance_scale": 2.5, "vae_encoder_device": "auto"}
    config["predict"] = {"devices": dict(devices)}
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(config))


def test_an_old_checkpoint_resumes_and_another_shape_is_refused(tiny_flux_dir: Path, tmp_path: Path) -> None:
    data = make_synthetic_pairs(tmp_path / "data", 4, seed=0)
    out = tmp_path / "out"
    train(_cfg(tiny_flux_dir, data, out, 2))
    _age(out / "checkpoint-2")
    resumed = train(_cfg(tiny_flux_dir, data, out, 3, resume_from_checkpoint="latest"))
    assert resumed.state.step == 3 and len(resumed.losses) == 3
    with pytest.raises(QfluxError, match=r"cannot resume from .*model\.lora\.r \(checkpoint 16, now 4\)"):
        train(_cfg(tiny_flux_dir, data, out, 4, resume_from_checkpoint="latest", **{"model.lora.r": 4}))
