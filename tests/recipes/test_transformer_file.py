"""``model.transformer_file``: a single safetensors file in place of the folder's transformer, read through diffusers'
``from_single_file`` with the folder's config. Training and predict on the file equal the folder's; a file of
another model is refused naming its first mismatched tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from qflux.config.parse import load_config
from qflux.lora.__main__ import main as lora_main
from qflux.models.flux_kontext.config import FluxKontextConfig
from recipes.flux_kontext_lora import main, train


def _cfg(model: Path, out: Path, **more: object) -> FluxKontextConfig:
    return load_config(FluxKontextConfig, None, {
        "model.pretrained_model_name_or_path": str(model), "model.dtype": "float32", "model.max_sequence_length": 8,
        "train.max_train_steps": 2, "logging.output_dir": str(out), "logging.write_sample": False,
        "logging.report_to": "none", **more,
    })  # fmt: skip


def test_training_and_predict_on_a_single_file_equal_the_folders(tiny_flux_dir: Path, tmp_path: Path) -> None:
    weights = load_file(tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    single = tmp_path / "flux1-kontext-tiny.safetensors"
    save_file(weights, str(single))
    folder = train(_cfg(tiny_flux_dir, tmp_path / "folder"))
    filed = train(_cfg(tiny_flux_dir, tmp_path / "file", **{"model.transformer_file": str(single)}))
    assert folder.losses == filed.losses
    assert all(torch.equal(folder.state.lora[k], filed.state.lora[k]) for k in folder.state.lora)
    # predict through the file: the folder's image; a merged file (the LoRA baked in) is the LoRA's image
    control = tmp_path / "control.png"
    Image.new("RGB", (32, 32), (200, 40, 90)).save(control)
    lora = tmp_path / "folder" / "pytorch_lora_weights.safetensors"
    lora_main(["merge", str(lora), f"--into={tiny_flux_dir}", "--family=flux_kontext", "--dtype=float32",
               f"--out={tmp_path / 'merged.safetensors'}"])  # fmt: skip
    common = [f"--image={control}", "--prompt=invert", "--num_inference_steps=2", "--model.dtype=float32",
              f"--model.pretrained_model_name_or_path={tiny_flux_dir}", "--model.max_sequence_length=8"]  # fmt: skip
    images = {}
    for name, extra in {"folder": [], "file": [f"--model.transformer_file={single}"], "lora": [f"--lora={lora}"],
                        "merged": [f"--model.transformer_file={tmp_path / 'merged.safetensors'}"]}.items():  # fmt: skip
        main(["predict", *common, *extra, f"--out={tmp_path / name}.png"])
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert np.array_equal(images["folder"], images["file"])
    assert np.abs(images["merged"] - images["lora"]).max() <= 1 and not np.array_equal(images["lora"], images["file"])


def test_a_file_of_another_model_is_refused_naming_its_tensor(tiny_flux_dir: Path, tmp_path: Path, capsys) -> None:
    weights = load_file(tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("to_q.weight"))
    wrong = dict(weights) | {name: torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    save_file({k: v for k, v in weights.items() if k != name}, str(tmp_path / "short.safetensors"))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    for file, message in [
        (tmp_path / "wrong.safetensors", f"{name} is [{weights[name].shape[0] + 1}, "),
        (tmp_path / "short.safetensors", f"lacks 1 tensor(s) the config at '{tiny_flux_dir / 'transformer'}' makes "),
        (tmp_path / "model.gguf", "is GGUF, which qflux does not read yet"),
        (tmp_path / "none.safetensors", "does not exist"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["train", f"--model.pretrained_model_name_or_path={tiny_flux_dir}", "--train.max_train_steps=1",
                  f"--model.transformer_file={file}", f"--logging.output_dir={tmp_path / 'out'}"])  # fmt: skip
        assert info.value.code == 2 and message in capsys.readouterr().err
