"""``model.lora.target_modules: [all-linear]`` trains on every family. Qwen-Image-Edit's last block drops its
text stream, so four adapters there never reach the loss: they train with a zero gradient (no crash), keep
ΔW = 0, and the start of the run names them; the other families have none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qflux.config.parse import load_config
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.qwen_image_edit.config import QwenImageEditConfig
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit

COMMON = {
    "model.dtype": "float32",
    "model.lora.target_modules": ["all-linear"],
    "model.lora.r": 4,
    "train.max_train_steps": 2,
    "logging.write_sample": False,
    "logging.report_to": "none",
    "seed": 0,
}
UNUSED = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
"""The modules of Qwen-Image's last block the loss does not reach: the model drops that block's text stream
(diffusers' QwenImageTransformerBlock), so its output projection and MLP are never used and its text queries
only make the dropped rows of the joint attention (its text keys and values still serve the image)."""


def _zero_factor(name: str) -> bool:
    return any(f".{p}." in name for p in ("lora_B", "hada_w2_b", "lokr_w1", "lokr_w1_a"))


@pytest.mark.parametrize(
    ("variant", "extra"),
    [
        ("edit", {"train.gradient_checkpointing": True}),
        ("edit", {"model.lora.kind": "dora"}),
        ("edit_plus", {"model.lora.kind": "loha"}),
        ("edit_2511", {"model.lora.kind": "lokr", "optimizer.name": "prodigy"}),
    ],
    ids=["edit-lora-checkpointing", "edit-dora", "edit_plus-loha", "edit_2511-lokr-prodigy"],
)
def test_qwen_trains_every_linear_layer_and_names_the_unused_ones(
    variant: str, extra: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from recipes.qwen_image_edit_lora import train

    model = build_qwen_image_edit(tmp_path / "model", seed=0, variant=variant)
    opts = {**COMMON, **extra, "model.variant": variant, "model.pretrained_model_name_or_path": str(model),
            "logging.output_dir": str(tmp_path / "out"), "cache.cache_dir": str(tmp_path / "cache")}  # fmt: skip
    result = train(load_config(QwenImageEditConfig, None, opts))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    last = result.models.transformer.config.num_layers - 1
    unused = [f"transformer_blocks.{last}.{m}" for m in UNUSED]
    printed = capsys.readouterr().out
    assert "4 adapter layer(s) get no gradient (the loss does not depend on their output" in printed
    line = next(x for x in printed.splitlines() if "get no gradient" in x)
    assert all(m in line for m in unused)
    for name, t in result.state.lora.items():  # unreached: ΔW stays 0; the rest trains
        if _zero_factor(name):
            assert torch.equal(t, torch.zeros_like(t)) == any(name.startswith(m + ".") for m in unused), name


def test_flux_kontext_trains_every_linear_layer(tiny_flux_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from recipes.flux_kontext_lora import train

    opts = {**COMMON, "model.pretrained_model_name_or_path": str(tiny_flux_dir), "model.max_sequence_length": 8,
            "logging.output_dir": str(tmp_path / "out")}  # fmt: skip
    result = train(load_config(FluxKontextConfig, None, opts))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert "get no gradient" not in capsys.readouterr().out
    assert all(not torch.equal(t, torch.zeros_like(t)) for t in result.state.lora.values())


def test_flux2_klein_trains_every_linear_layer(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from qflux.models.flux2.config import Flux2KleinConfig
    from qflux.models.flux2.tiny import build_flux2_klein
    from recipes.flux2_klein_lora import train

    model = build_flux2_klein(tmp_path / "model", seed=0)
    opts = {**COMMON, "model.pretrained_model_name_or_path": str(model), "logging.output_dir": str(tmp_path / "out")}
    result = train(load_config(Flux2KleinConfig, None, opts))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    printed = capsys.readouterr().out
    assert "get no gradient" not in printed
    assert "would lose 5 adapted layer(s)" in printed  # the diffusers file in ComfyUI: the end block says so
    assert all(not torch.equal(t, torch.zeros_like(t)) for t in result.state.lora.values())
