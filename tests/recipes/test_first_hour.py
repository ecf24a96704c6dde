"""A new user's first hour: help that exits 0, lists as typed, suggestions that find the key, runs that
never mix or overwrite, and a start and an end that say what is happening."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qflux.config.errors import QfluxError
from qflux.data.synthetic import make_synthetic_pairs
from qflux.lora.formats import check_convertible
from qflux.train.plots import smoothing_window
from qflux.train.summary import mean_loss
from recipes import flux2_dev_lora, flux_kontext_lora, qwen_image_edit_lora

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_pairs(tmp_path_factory.mktemp("pairs"), 4, seed=0)


def _args(model: Path, data: Path, out: Path, steps: int, *more: str) -> list[str]:
    return [
        f"--model.pretrained_model_name_or_path={model}",
        "--model.max_sequence_length=8",
        f"--data.dataset_path={data}",
        f"--train.max_train_steps={steps}",
        f"--logging.output_dir={out}",
        "--logging.write_sample=false",
        *more,
    ]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("verb", ["train", "cache", "plan", "check", "predict"])
@pytest.mark.parametrize("recipe", [flux_kontext_lora, qwen_image_edit_lora, flux2_dev_lora])
def test_help_exits_zero_with_usage_examples_and_keys(recipe, verb: str, capsys) -> None:
    for flag in ("--help", "-h"):
        recipe.main([verb, flag])
        text = capsys.readouterr().out
        assert text.startswith("usage: python -m recipes.") and "examples:" in text
        for named in re.findall(r"--config=(recipes/configs/\S+\.yaml)", text):  # the examples name shipped configs
            assert (ROOT / named).is_file(), named
        assert "[model]" in text and "--model.dtype=bfloat16" in text
        if verb == "predict":
            assert "--height=null" in text and "--lora=null" in text and "[train]" not in text
        else:
            steps = 300 if recipe is flux_kontext_lora else 150  # FLUX.1's default run: the toy, 300 steps
            assert f"--train.max_train_steps={steps}" in text and "--logging.overwrite=false" in text


def test_help_from_a_shell_exits_zero_and_prints_no_library_noise() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "recipes.flux_kontext_lora", "train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "kernels-community" not in proc.stdout + proc.stderr


def test_a_list_as_typed_and_suggestions_by_the_last_part(
    tiny_flux_dir: Path, data: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    flux_kontext_lora.main(
        ["train", *_args(tiny_flux_dir, data, out, 1, "--model.lora.target_modules=[to_q,to_out.0]")]
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["lora"]["target_modules"] == ["to_q", "to_out.0"]
    with pytest.raises(SystemExit) as info:
        flux_kontext_lora.main(["train", "--train.lr=1e-4"])
    assert info.value.code == 2 and "did you mean 'optimizer.lr'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flux_kontext_lora.main(["train", f"--data.dataset_path={tmp_path / 'nowhere'}"])
    assert f"dataset '{tmp_path / 'nowhere'}' does not exist" in capsys.readouterr().err


def test_runs_do_not_mix(tiny_flux_dir: Path, data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    flux_kontext_lora.main(["train", *_args(tiny_flux_dir, data, out, 2, "--train.checkpointing_steps=0")])
    assert (out / "checkpoint-2" / "state.json").is_file()  # a finished run writes its last step
    before = _digest(out)
    capsys.readouterr()
    # a fresh run into the same folder: refused with the two ways out, nothing touched
    with pytest.raises(SystemExit) as info:
        flux_kontext_lora.main(["train", *_args(tiny_flux_dir, data, out, 3, "--seed=1")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--resume_from_checkpoint=latest" in err and "logging.overwrite: true" in err
    assert _digest(out) == before
    # resuming the finished run: said, nothing changes
    flux_kontext_lora.main(["train", *_args(tiny_flux_dir, data, out, 2, "--resume_from_checkpoint=latest")])
    assert "has finished" in capsys.readouterr().out and _digest(out) == before
    # a larger max_train_steps continues from the last step
    flux_kontext_lora.main(["train", *_args(tiny_flux_dir, data, out, 3, "--resume_from_checkpoint=latest")])
    assert "resuming from" in capsys.readouterr().out and (out / "checkpoint-3").is_dir()
    # overwrite removes the previous run's files first, and says so; a user's own file stays
    (out / "notes.txt").write_text("mine")
    flux_kontext_lora.main(["train", *_args(tiny_flux_dir, data, out, 1, "--logging.overwrite=true")])
    said = capsys.readouterr().out
    assert "logging.overwrite: removed the previous run's" in said and "checkpoint-3" in said
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "mine"
    # ... but never a file this run reads
    weight = f"--model.lora.pretrained_weight={out / 'pytorch_lora_weights.safetensors'}"
    with pytest.raises(SystemExit):
        flux_kontext_lora.main(["train", *_args(tiny_flux_dir, data, out, 1, "--logging.overwrite=true", weight)])
    assert "would remove model.lora.pretrained_weight" in capsys.readouterr().err
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_start_and_end_say_what_happens(tiny_flux_dir: Path, data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    result = flux_kontext_lora.train(
        flux_kontext_lora.load_config(
            flux_kontext_lora.FluxKontextConfig,
            None,
            {"model.pretrained_model_name_or_path": str(tiny_flux_dir), "model.max_sequence_length": 8,
             "data.dataset_path": str(data), "train.max_train_steps": 12, "logging.output_dir": str(out),
             "logging.write_sample": False, "train.gradient_accumulation_steps": 2, "model.quantize": "nf4",
             "data.batch_size": 2},
        )
    )  # fmt: skip
    text = capsys.readouterr().out
    for line in (
        f"model    {tiny_flux_dir} (bfloat16, nf4: ",
        "kept in bfloat16 (a shape the kernels cannot take)",
        "devices  transformer cpu, vae cpu, text_encoder cpu, text_encoder_2 cpu",
        f"dataset  {data}: 4 pairs in 2 bucket(s)\n           64×64: 2 pairs\n           80×48: 2 pairs\n",
        "batch    2 per micro-batch × 2 accumulated × 1 rank(s) = 4 samples per step",
        "steps    12",
        "compile  eager (no compile)",
        f"output   {out}",
    ):
        assert line in text, line
    assert re.search(rf"{re.escape(str(out / 'pytorch_lora_weights.safetensors'))} +diffusers", text)
    assert "ComfyUI: this one, in models/loras/, a LoraLoaderModelOnly node" in text
    assert f"tensorboard --logdir {out / 'logs'}" in text and f"last checkpoint: {out / 'checkpoint-12'}" in text
    # the end's loss is the progress bar's mean, and says so
    assert f"(mean of 10 steps, as the progress bar) {mean_loss(result.losses, first=True):.4f}" in text
    assert f"→ {mean_loss(result.losses):.4f} at the end" in text
    assert text.index("pytorch_lora_weights.safetensors") < text.index("pytorch_lora_weights_comfyui")


def test_every_module_training_accepts_converts_or_is_refused_first() -> None:
    check_convertible(["norm_out.linear", "single_transformer_blocks.0.proj_mlp", "x_embedder"], "flux")
    check_convertible(["transformer_blocks.0.img_mod.1"], "qwen")
    with pytest.raises(QfluxError, match=r"no ComfyUI name \(first: pos_embed.proj\).*lora_format: diffusers"):
        check_convertible(["pos_embed.proj"], "flux")


def test_short_runs_draw_their_moving_average() -> None:
    assert smoothing_window(1) == 0 and smoothing_window(5) == 5 and smoothing_window(20) == 10
    assert smoothing_window(5000) == 250


def test_the_diffusers_file_is_written_before_anything_that_can_fail(
    tiny_flux_dir: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qflux.train import driver as train_loop

    def broken(*args, **kwargs):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(train_loop, "save_lora_comfyui", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="conversion failed"):
        flux_kontext_lora.main(["train", *_args(tiny_flux_dir, data, out, 2)])
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "checkpoint-2").is_dir()
