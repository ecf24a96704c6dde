"""``train.ema_decay`` on the tiny models: the average's two files are written beside the raw ones and
differ from them, ``predict`` reads them, a resumed run writes the same average bit for bit, and
``validation.use_ema`` needs the average."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes import flux_kontext_lora, qwen_image_edit_lora
from tests.flux_kontext_batches import TINY, tiny_args


@pytest.mark.parametrize("recipe", [flux_kontext_lora, qwen_image_edit_lora])
def test_the_average_is_written_beside_the_raw_lora(recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    recipe.main(["train", f"--logging.output_dir={out}", "--train.max_train_steps=3", "--train.ema_decay=0.9",
                 "--logging.write_sample=false", *tiny_args(recipe)])  # fmt: skip
    raw, ema = (load_file(out / f"pytorch_lora_weights{s}.safetensors") for s in ("", "_ema"))
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    raw_c, ema_c = (load_file(out / f"pytorch_lora_weights{s}_comfyui.safetensors") for s in ("", "_ema"))
    assert raw_c.keys() == ema_c.keys() and any(not torch.equal(raw_c[k], ema_c[k]) for k in raw_c)
    image = tmp_path / "edited.png"
    recipe.predict(image=_control(), prompt="invert the colors", out=str(image), num_inference_steps=2,
                   lora=str(out / "pytorch_lora_weights_ema.safetensors"),
                   **{k[2:]: v for k, v in (a.split("=") for a in tiny_args(recipe, data=False))})  # fmt: skip
    assert image.is_file()


def _control() -> str:
    from qflux.train.builtin import BUILTIN_SYNTHETIC_DATASET, resolve_dataset_path

    root = resolve_dataset_path(BUILTIN_SYNTHETIC_DATASET)
    return str(sorted((root / "control_images").iterdir())[0])


def test_a_resumed_run_writes_the_same_average(tmp_path: Path) -> None:
    args = ["--train.ema_decay=0.8", "--train.checkpointing_steps=2", "--logging.write_sample=false",
            "--train.lora_format=diffusers", *TINY]  # fmt: skip
    flux_kontext_lora.main(
        ["train", f"--logging.output_dir={tmp_path / 'straight'}", "--train.max_train_steps=4", *args]
    )
    flux_kontext_lora.main(
        ["train", f"--logging.output_dir={tmp_path / 'resumed'}", "--train.max_train_steps=2", *args]
    )
    flux_kontext_lora.main(["train", f"--logging.output_dir={tmp_path / 'resumed'}", "--train.max_train_steps=4",
                            "--resume_from_checkpoint=latest", *args])  # fmt: skip
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_validating_the_average_needs_one(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as info:
        flux_kontext_lora.main(["train", f"--logging.output_dir={tmp_path}", "--validation.use_ema=true", *TINY])
    assert info.value.code == 2 and "set train.ema_decay" in capsys.readouterr().err
