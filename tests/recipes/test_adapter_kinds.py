"""Every adapter kind and optimizer through the recipes: pinned first losses, a resumed run that
writes the same files bit for bit as a straight one, Prodigy's finite losses, the files
``predict --lora`` reads, and the settings refused with the fix named."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qflux.config.parse import load_config
from qflux.models.flux_kontext.config import FluxKontextConfig
from recipes import flux_kontext_lora, qwen_image_edit_lora
from recipes.flux_kontext_lora import train as run

# (kind, optimizer) → the first four losses of the seeded fp32 run below, pinned from a reference run
# (the first is the base model's, the same for every kind: each starts at ΔW = 0)
PINNED = {
    ("dora", "adamw"): [1.41037917137146, 1.3679938316345215, 1.4536330699920654, 1.4015085697174072],
    ("lokr", "prodigy"): [1.41037917137146, 1.369526743888855, 1.4560537338256836, 1.4037728309631348],
    ("loha", "adamw"): [1.41037917137146, 1.3693454265594482, 1.4558073282241821, 1.4035098552703857],
    ("lora", "prodigy"): [1.41037917137146, 1.369523286819458, 1.456047534942627, 1.403766393661499],
}


def _overrides(out: Path, steps: int, kind: str, optimizer: str, **more: object) -> dict[str, object]:
    return {
        "model.pretrained_model_name_or_path": "builtin:tiny-flux-kontext",
        "data.dataset_path": "builtin:synthetic",
        "data.batch_size": 2,
        "train.loss_mask": "none",  # the pins' setting (FLUX.1's default is auto since they were taken)
        "model.lora.target_modules": ["to_k", "to_q", "to_v", "to_out.0"],  # the pins' (default: all-linear)
        "model.dtype": "float32",
        "model.max_sequence_length": 32,
        "model.lora.kind": kind,
        "optimizer.name": optimizer,
        "train.max_train_steps": steps,
        "train.checkpointing_steps": 2,
        "logging.output_dir": str(out),
        "logging.write_sample": False,
        "seed": 0,
        **more,
    }


@pytest.mark.parametrize(("kind", "optimizer"), list(PINNED))
def test_each_kind_trains_resumes_bitwise_and_saves(tmp_path: Path, kind: str, optimizer: str) -> None:
    straight = run(load_config(FluxKontextConfig, None, _overrides(tmp_path / "a", 4, kind, optimizer)))
    assert straight.losses[:4] == pytest.approx(PINNED[(kind, optimizer)], rel=1e-4)
    assert all(math.isfinite(x) for x in straight.losses)
    run(load_config(FluxKontextConfig, None, _overrides(tmp_path / "b", 2, kind, optimizer)))
    again = _overrides(tmp_path / "b", 4, kind, optimizer, resume_from_checkpoint="latest")
    resumed = run(load_config(FluxKontextConfig, None, again))
    assert resumed.losses == straight.losses
    names = ["pytorch_lora_weights.safetensors"] + (
        ["pytorch_lora_weights_comfyui.safetensors"] if kind != "dora" else []
    )
    for name in names:
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (kind == "dora") != (tmp_path / "a" / "pytorch_lora_weights_comfyui.safetensors").is_file()


@pytest.mark.parametrize("recipe", [flux_kontext_lora, qwen_image_edit_lora])
@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_predict_reads_what_each_kind_wrote(recipe, kind: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    recipe.main(["train", f"--logging.output_dir={out}", "--train.max_train_steps=2", f"--model.lora.kind={kind}",
                 "--model.lora.init_lora_weights=false", "--logging.write_sample=false",
                 "--train.ema_decay=0.5"])  # fmt: skip
    files = ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"]
    if kind != "dora":
        files.append("pytorch_lora_weights_comfyui.safetensors")
    for name in files:
        image = tmp_path / f"{name}.png"
        recipe.predict(image=_control(), prompt="invert the colors", out=str(image), num_inference_steps=2,
                       lora=str(out / name))  # fmt: skip
        assert image.is_file()


def _control() -> str:
    from qflux.train.builtin import BUILTIN_SYNTHETIC_DATASET, resolve_dataset_path

    root = resolve_dataset_path(BUILTIN_SYNTHETIC_DATASET)
    return str(sorted((root / "control_images").iterdir())[0])


@pytest.mark.parametrize(
    ("args", "fix"),
    [
        (["--model.lora.kind=dora", "--train.lora_format=comfyui"], "set train.lora_format: diffusers"),
        (["--model.lora.kind=dora", "--train.blocks_to_swap=1"], "set train.blocks_to_swap: 0"),
        (["--model.lora.kind=dora", "--train.compile=regional"], "use train.compile: auto or false"),
        (["--optimizer.d_coef=0.5"], "set optimizer.name: prodigy"),
    ],
    ids=["dora-comfyui", "dora-block-swap", "dora-compile", "prodigy-key-with-adamw"],
)
def test_settings_that_cannot_work_are_refused_with_the_fix(tmp_path: Path, capsys, args: list[str], fix: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as info:
        flux_kontext_lora.main(["train", f"--logging.output_dir={tmp_path}", *args])
    assert info.value.code == 2 and fix in capsys.readouterr().err


def test_resuming_with_another_optimizer_is_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    args = [
        "train",
        f"--logging.output_dir={tmp_path}",
        "--logging.write_sample=false",
        "--train.checkpointing_steps=1",
    ]
    flux_kontext_lora.main([*args, "--train.max_train_steps=1"])
    with pytest.raises(SystemExit) as info:
        flux_kontext_lora.main([*args, "--train.max_train_steps=2", "--optimizer.name=prodigy",
                                "--resume_from_checkpoint=latest"])  # fmt: skip
    assert info.value.code == 2 and "optimizer.name (checkpoint 'adamw', now 'prodigy')" in capsys.readouterr().err
