"""No dead config keys: every key of the schema changes what a run does or produces.

For each key the table gives another value (and, where the key only matters in some setting, the
setting). The recipe runs in-process with the base value and with the other value, and a
fingerprint of the run (losses, final LoRA, files written, saved dtypes, placements, errors)
must differ. A new key without an entry here fails the test.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config, schema_keys
from qflux.data.dataset import PairDataset
from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.flux_kontext.tiny import build_flux_kontext
from qflux.models.qwen_image_edit.config import QwenImageEditConfig
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
from qflux.weights.block_swap import SwappedLinear
from recipes import flux_kontext_lora, qwen_image_edit_lora

CACHED = {"cache.use_cache": True}
VALIDATING = {
    "validation.enabled": True,
    "validation.dataset_path": "{other_data}",
    "validation.num_inference_steps": 1,
}
MASKED = {"train.loss_mask": "masks", "data.dataset_path": "{masked_data}"}
NAN = {"optimizer.lr": 1e30, "train.max_nonfinite_steps": 100}

# key: (other value, settings applied to both runs). "{root}", "{other_model}", "{other_data}" and
# "{bad_data}" are filled in per run.
ALTERNATIVES: dict[str, tuple[Any, dict[str, Any]]] = {
    "seed": (1, {}),
    # the fresh base run replaces the prerun (logging.overwrite); "latest" resumes it
    "resume_from_checkpoint": ("latest", {"train.checkpointing_steps": 1, "_prerun": 1, "logging.overwrite": True}),
    "model.pretrained_model_name_or_path": ("{other_model}", {}),
    "model.dtype": ("bfloat16", {}),
    "model.max_sequence_length": (4, {}),
    "model.quantize": ("fp8", {}),
    "model.transformer_file": ("{other_model}/transformer/diffusion_pytorch_model.safetensors", {}),
    "model.quantize_text_encoders": (True, {"model.quantize": "fp8"}),  # fp8: every width (4 bits: test_quantize)
    "model.lora.kind": ("lokr", {}),
    "model.lora.r": (4, {}),
    "model.lora.lora_alpha": (4, {}),
    "model.lora.init_lora_weights": (True, {}),
    "model.lora.target_modules": (["to_q"], {}),
    "data.dataset_path": ("{other_data}", {}),
    "data.batch_size": (1, {}),
    "data.caption_dropout_rate": (1.0, {}),
    "data.prompt_image_dropout_rate": (1.0, {}),
    "data.max_pixels": (1024, {}),
    "data.buckets": ("exact", {"data.dataset_path": "{mixed_data}"}),  # its 70×66 and 84×52 pairs are cropped
    "data.control_size": ("keep", {"data.max_pixels": 1024}),  # the controls stay at their own size, not 32×32
    "data.control_max_pixels": (1024, {}),
    "data.drop_last": (True, {"data.dataset_path": "{mixed_data}", "data.batch_size": 2, "train.max_train_steps": 4}),
    "data.shuffle": (False, {"data.batch_size": 1}),
    "data.num_workers": (1, {}),
    "data.skip_invalid": (True, {"data.dataset_path": "{bad_data}"}),
    "optimizer.lr": (1e-2, {}),
    "optimizer.betas": ([0.5, 0.9], {}),
    "optimizer.weight_decay": (0.5, {}),
    "optimizer.eps": (0.1, {}),
    "optimizer.name": ("prodigy", {}),
    "optimizer.d0": (1e-3, {"optimizer.name": "prodigy"}),
    "optimizer.d_coef": (0.1, {"optimizer.name": "prodigy"}),
    "optimizer.use_bias_correction": (True, {"optimizer.name": "prodigy"}),
    "optimizer.safeguard_warmup": (
        True,
        {"optimizer.name": "prodigy", "lr_scheduler.warmup_steps": 2, "train.max_train_steps": 4},
    ),
    "lr_scheduler.scheduler_type": ("linear", {}),
    "lr_scheduler.warmup_steps": (1, {}),
    "lr_scheduler.num_cycles": (1.0, {"lr_scheduler.scheduler_type": "cosine"}),
    "train.max_train_steps": (3, {}),
    "train.gradient_accumulation_steps": (2, {}),
    "train.max_grad_norm": (1e-6, {}),
    "train.gradient_checkpointing": (True, {}),
    "train.ema_decay": (0.9, {}),  # writes the average's two files
    "train.loss_mask": ("masks", {"data.dataset_path": "{masked_data}"}),  # auto: tests/recipes/test_loss_mask.py
    "train.unmasked_weight": (0.9, {"train.loss_mask": "masks", "data.dataset_path": "{masked_data}"}),
    "train.loss": ("pseudo_huber", {}),
    "train.huber_c": (0.01, {"train.loss": "huber"}),
    "train.preserve": ("base", MASKED),
    "train.preserve_weight": (5.0, {"train.preserve": "base", **MASKED}),
    "train.preserve_prompt": ("a photo", {}),
    "train.route": ("tread", {}),
    "train.route_ratio": (0.25, {"train.route": "tread"}),
    "train.route_blocks": ([0, -1], {"train.route": "tread"}),
    "train.route_keep_changed": (False, {"train.route": "tread", **MASKED}),
    "train.blocks_to_swap": (1, {}),  # the same LoRA by design: the swapped layers are what shows
    # the compiled run itself is tested in tests/qflux/test_compile.py; here: the key is read
    "train.compile": (True, {"train.gradient_checkpointing": True}),
    # refused on CPU (the fp8 maths itself: tests/qflux/test_fp8.py)
    "train.fp8_matmul": (True, {}),
    "train.lora_format": ("diffusers", {}),
    # only read under torchrun with several ranks: tests/recipes/test_distributed.py runs both engines
    # (and checks that fsdp shards the base); one process ignores it by design
    "train.distributed": ("fsdp", {"_torchrun_only": True}),
    "model.lora.pretrained_weight": (
        "{root}/prior/pytorch_lora_weights.safetensors",
        {"_prerun": 1, "_prerun_out": "{root}/prior"},
    ),
    # a fresh run into the prerun's folder: refused by default (the base's error), replaced with true
    "logging.overwrite": (True, {"_prerun": 1}),
    "logging.report_to": ("tensorboard", {}),
    "logging.logging_dir": ("elsewhere", {"logging.report_to": "jsonl"}),
    "validation.enabled": (True, {k: v for k, v in VALIDATING.items() if k != "validation.enabled"}),
    "validation.validation_steps": (1, VALIDATING),
    "validation.num_validation_samples": (1, VALIDATING),
    "validation.dataset_path": ("{data}", VALIDATING),
    "validation.samples": ([["{other_data}/control_images/sample_000.png", "a prompt"]], VALIDATING),
    "validation.num_inference_steps": (2, VALIDATING),
    "validation.use_ema": (True, {**VALIDATING, "train.ema_decay": 0.5}),
    "model.guidance_scale": (5.0, {}),
    "train.weighting_scheme": ("sigma_sqrt", {}),
    "train.timestep_sampling": ("logit_normal", {}),
    "train.logit_mean": (1.0, {"train.timestep_sampling": "logit_normal"}),
    "train.logit_std": (0.3, {"train.timestep_sampling": "logit_normal"}),
    "train.timestep_shift": (1.5, {"train.timestep_sampling": "shift"}),
    "train.mode_scale": (0.5, {"train.timestep_sampling": "mode"}),
    "train.save_dtype": ("bfloat16", {}),
    "train.checkpointing_steps": (1, {}),
    "train.checkpoints_total_limit": (1, {"train.checkpointing_steps": 1}),
    "train.max_nonfinite_steps": (1, NAN),
    "devices.transformer": ("cuda", {}),
    "devices.vae": ("cuda", {}),
    "devices.text_encoder": ("cuda", {}),
    "devices.text_encoder_2": ("cuda", {}),
    "logging.output_dir": ("{root}/elsewhere", {}),
    "logging.write_sample": (True, {}),
    "cache.use_cache": (True, {}),
    "cache.cache_dir": ("{root}/cache2", CACHED),
}

# The Qwen-Image-Edit recipe: its schema is FLUX's without the FLUX-only keys, plus model.variant.
QWEN_ALTERNATIVES = {k: v for k, v in ALTERNATIVES.items() if k in schema_keys(QwenImageEditConfig)}
QWEN_ALTERNATIVES["model.variant"] = ("edit_plus", {})
QWEN_ALTERNATIVES["model.transformer_file"] = ("{qwen_other_model}/transformer/diffusion_pytorch_model.safetensors", {})
# Both recipes run qflux.train.run and qflux.train.driver, so the keys those read are walked once, with
# FLUX (above). With Qwen we walk the keys whose reading is Qwen's own code: the model, its
# conditioning and dropout, placements, the sample and the predict command.
QWEN_WALK = sorted(
    k
    for k in QWEN_ALTERNATIVES
    if k.startswith(("model.", "devices.", "cache."))
    or k in ("data.caption_dropout_rate", "data.prompt_image_dropout_rate", "data.max_pixels",
             "train.weighting_scheme", "logging.write_sample", "validation.num_inference_steps")
)  # fmt: skip
MIXED_SIZES = ((64, 64), (80, 48), (70, 66), (84, 52))
"""Two aspect families: buckets crop the 70×66 and 84×52 pairs into the 64×64 and 80×48 buckets."""
RECIPES: dict[str, Any] = {
    "flux": (FluxKontextConfig, flux_kontext_lora, {"model.max_sequence_length": 8}),
    "qwen": (QwenImageEditConfig, qwen_image_edit_lora, {}),
}


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("keys")
    bad = make_synthetic_pairs(root / "bad", 4, seed=1)
    (bad / "training_images" / "sample_002.txt").write_text("")
    return {
        "model": str(tiny_flux_dir),
        "other_model": str(build_flux_kontext(root / "other-model", seed=1)),
        "qwen_model": str(build_qwen_image_edit(root / "qwen", seed=0)),
        "qwen_other_model": str(build_qwen_image_edit(root / "qwen-other", seed=1)),
        "data": str(make_synthetic_pairs(root / "data", 4, seed=0)),
        "other_data": str(make_synthetic_pairs(root / "other-data", 4, seed=9)),
        "mixed_data": str(make_synthetic_pairs(root / "mixed", 6, seed=0, sizes=MIXED_SIZES)),
        "bad_data": str(bad),
        "masked_data": str(_with_masks(make_synthetic_pairs(root / "masked", 4, seed=0))),
    }


def _with_masks(root: Path) -> Path:
    """``masks/NAME.png`` for every target: white on its left half."""
    from PIL import Image

    (root / "masks").mkdir()
    for target in (root / "training_images").glob("*.png"):
        w, h = Image.open(target).size
        mask = Image.new("L", (w, h), 0)
        mask.paste(255, (0, 0, w // 2, h))
        mask.save(root / "masks" / target.name)
    return root


def _fill(value: Any, fills: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [_fill(v, fills) for v in value]
    return value.format(**fills) if isinstance(value, str) and "{" in value else value


def _fingerprint(
    root: Path, settings: dict[str, Any], places: dict[str, str], monkeypatch, recipe: str = "flux"
) -> dict[str, Any]:
    cls, module, extra = RECIPES[recipe]
    run, predict = module.train, module.predict
    if recipe == "qwen":
        places = {**places, "model": places["qwen_model"], "other_model": places["qwen_other_model"]}
    fills = {**places, "root": str(root)}
    settings = dict(settings)
    command = settings.pop("_command", "train")
    prerun = settings.pop("_prerun", 0)
    prerun_out = settings.pop("_prerun_out", "{root}/out")
    overrides = {
        "model.pretrained_model_name_or_path": places["model"],
        "model.dtype": "float32",
        **extra,
        "data.dataset_path": places["data"],
        "train.max_train_steps": 2,
        "train.checkpointing_steps": 0,
        "logging.output_dir": "{root}/out",
        "logging.write_sample": False,
        "logging.report_to": "none",
        "cache.cache_dir": "{root}/cache",
        **settings,
    }
    overrides = {k: _fill(v, fills) for k, v in overrides.items()}
    root.mkdir(parents=True, exist_ok=True)
    pids = root / "pids.txt"
    original = PairDataset.__getitem__

    def spy(self: PairDataset, i: int) -> dict[str, Any]:
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return original(self, i)

    monkeypatch.setattr(PairDataset, "__getitem__", spy)
    out: dict[str, Any] = {}
    try:
        if prerun:
            prior = {"train.max_train_steps": prerun, "logging.output_dir": _fill(prerun_out, fills)}
            run(load_config(cls, None, {**overrides, **prior}))
        if command == "predict":
            image = next((Path(places["data"]) / "control_images").iterdir())
            predict(image=str(image), prompt="x", out=str(root / "p.png"), num_inference_steps=1, **overrides)
        else:
            result = run(load_config(cls, None, overrides))
            out["losses"] = result.losses
            out["steps_run"] = len(result.step_seconds)
            out["lora"] = hashlib.sha256(
                b"".join(t.cpu().numpy().tobytes() for t in result.state.lora.values())
            ).hexdigest()
            out["devices"] = {
                n: str(getattr(result.models, n).device)
                for n in ("transformer", "vae", "text_encoder", "text_encoder_2")
                if getattr(result.models, n, None) is not None
            }
            out["checkpointing"] = result.models.transformer.gradient_checkpointing
            out["swapped"] = sum(isinstance(m, SwappedLinear) for m in result.models.transformer.modules())
    except QfluxError as e:
        out["error"] = str(e).replace(str(root), "{root}")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "pids.txt")
    # TensorBoard names event files by time, host and pid: keep the folder and the kind only
    out["files"] = [f.split(".tfevents.")[0] if ".tfevents." in f else f for f in files]
    out["validation"] = {
        f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:16] for f in files if "/validation/" in f
    }
    lora_file = next((root / f for f in files if f.endswith("pytorch_lora_weights.safetensors")), None)
    if lora_file is not None:
        out["saved_dtypes"] = sorted({str(t.dtype) for t in load_file(lora_file).values()})
    out["other_process_loaded"] = pids.is_file() and any(int(x) != os.getpid() for x in pids.read_text().split())
    monkeypatch.setattr(PairDataset, "__getitem__", original)
    return out


@pytest.mark.parametrize(
    ("cls", "table"), [(FluxKontextConfig, ALTERNATIVES), (QwenImageEditConfig, QWEN_ALTERNATIVES)]
)
def test_every_key_has_an_alternative(cls: type, table: dict[str, Any]) -> None:
    keys = set(schema_keys(cls))
    assert keys == set(table), (sorted(keys - set(table)), sorted(set(table) - keys))


@pytest.mark.parametrize("key", sorted(ALTERNATIVES))
def test_key_changes_behaviour_or_output(key: str, tmp_path: Path, places: dict[str, str], monkeypatch) -> None:
    other, settings = ALTERNATIVES[key]
    if settings.get("_torchrun_only"):
        pytest.skip("read only under torchrun: covered by tests/recipes/test_distributed.py")
    base = _fingerprint(tmp_path / "base", settings, places, monkeypatch)
    changed = _fingerprint(tmp_path / "changed", {**settings, key: other}, places, monkeypatch)
    assert base != changed, f"{key}: setting it to {other!r} changed nothing observable"
    assert "error" not in base or key in ("data.skip_invalid", "train.compile", "logging.overwrite"), base.get("error")


def test_fingerprint_is_deterministic(tmp_path: Path, places: dict[str, str], monkeypatch) -> None:
    a = _fingerprint(tmp_path / "a", {}, places, monkeypatch)
    b = _fingerprint(tmp_path / "b", {}, places, monkeypatch)
    assert a == b and "error" not in a
    assert np.isfinite(a["losses"]).all() and torch.tensor(a["losses"]).numel() == 2


@pytest.mark.parametrize("key", QWEN_WALK)
def test_qwen_key_changes_behaviour_or_output(key: str, tmp_path: Path, places: dict[str, str], monkeypatch) -> None:
    other, settings = QWEN_ALTERNATIVES[key]
    base = _fingerprint(tmp_path / "base", settings, places, monkeypatch, "qwen")
    changed = _fingerprint(tmp_path / "changed", {**settings, key: other}, places, monkeypatch, "qwen")
    assert base != changed, f"{key}: setting it to {other!r} changed nothing observable"
    assert "error" not in base, base.get("error")
