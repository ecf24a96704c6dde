"""The recipe, run in-process. The default run (the toy model learning an edit it was never taught): exact step
count, outputs that load in diffusers, the edit visible in sample.png and said in the end block, a clear drop
of the held-out loss. On the tiny model: pinned first losses and bitwise repeatability."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from qflux.config.parse import load_config
from qflux.data.pairs import scan_pairs
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.flux_kontext.loss import make_loss_fn
from qflux.train.builtin import resolve_dataset_path
from qflux.train.state import evaluate_loss
from recipes.flux_kontext_lora import main
from recipes.flux_kontext_lora import train as run
from tests.flux_kontext_batches import fixed_eval_batches

ROOT = Path(__file__).resolve().parents[2]

# First losses of the seeded fp32 run on the tiny model, pinned from a reference run of this recipe.
PINNED_FIRST_LOSSES = [1.4103789329528809, 1.3681137561798096, 1.4538452625274658, 1.4017152786254883]
# The held-out loss at fixed σ ∈ {0.25, 0.5, 0.75} must fall by at least this fraction in the default run.
HELDOUT_MARGIN = 0.2
# sample.png's psnr_changed must rise by at least this much (dB) in the default run.
SAMPLE_GAIN = 5.0


def _overrides(out: Path, steps: int) -> dict[str, object]:
    return {
        "model.pretrained_model_name_or_path": "builtin:tiny-flux-kontext",
        "data.dataset_path": "builtin:synthetic",
        "data.batch_size": 2,
        "train.loss_mask": "none",  # the pins' setting (FLUX.1's default is auto since they were taken)
        "model.lora.target_modules": ["to_k", "to_q", "to_v", "to_out.0"],  # the pins' (default: all-linear)
        "model.dtype": "float32",
        "model.max_sequence_length": 32,
        "train.max_train_steps": steps,
        "logging.output_dir": str(out),
        "seed": 0,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """The default run, as ``python -m recipes.flux_kontext_lora`` makes it, and what it printed."""
    out = tmp_path_factory.mktemp("run")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        result = run(load_config(FluxKontextConfig, None, {"logging.output_dir": str(out)}))
    return result, printed.getvalue()


def test_first_losses_are_pinned(tmp_path: Path) -> None:
    losses = run(load_config(FluxKontextConfig, None, _overrides(tmp_path, 4))).losses
    assert losses == pytest.approx(PINNED_FIRST_LOSSES, rel=1e-4)


def test_the_default_run_shows_the_edit_appearing(trained) -> None:
    """sample.png's LoRA edit is closer to the target where the pair changes, by SAMPLE_GAIN dB or more, and the end
    block says by how much."""
    result, printed = trained
    assert len(result.losses) == 300 == result.state.step
    line = next(x for x in printed.splitlines() if x.startswith("sample.png: edit PSNR"))
    before, after = (float(v) for v in re.findall(r"([0-9.]+) dB (?:before|after)", line))
    print(line)
    assert after >= before + SAMPLE_GAIN
    # FLUX.1's default adapter: rank 16 on every linear layer of the transformer, each r·(in + out) parameters
    linears = [m for m in FluxTransformer2DModel.from_pretrained(resolve_model(result), subfolder="transformer")
               .modules() if isinstance(m, torch.nn.Linear)]  # fmt: skip
    params = sum(16 * (m.in_features + m.out_features) for m in linears)
    assert f"on every linear layer: {len(linears)} layers, {params:,} parameters" in printed


def test_outputs_are_written(trained) -> None:
    trained = trained[0]
    out = Path(trained.config.logging.output_dir)
    for name in ("pytorch_lora_weights.safetensors", "config.yaml", "loss.png", "sample.png"):
        assert (out / name).is_file(), name
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_train_steps"] == 300 and saved["model"]["dtype"] == "bfloat16"
    pipe = FluxKontextPipeline.from_pretrained(resolve_model(trained), dtype=torch.float32)
    pipe.load_lora_weights(out)  # loads in diffusers as is


def resolve_model(trained) -> str:
    from qflux.train.builtin import resolve_model_path

    return resolve_model_path(trained.config.model.pretrained_model_name_or_path)


def test_heldout_loss_drops(trained) -> None:
    trained = trained[0]
    held = scan_pairs(resolve_dataset_path(trained.config.data.dataset_path, heldout=True), None, multiple=16)
    batches = fixed_eval_batches(trained.config, trained.models, held)
    loss_fn = make_loss_fn(trained.models.transformer, guidance_scale=2.5)
    before = evaluate_loss(loss_fn, trained.initial_lora, batches).item()
    after = evaluate_loss(loss_fn, trained.state.lora, batches).item()
    print(f"held-out loss {before:.4f} -> {after:.4f}")
    assert after < (1 - HELDOUT_MARGIN) * before


def test_same_seed_gives_bitwise_the_same_lora(tmp_path: Path) -> None:
    a = run(load_config(FluxKontextConfig, None, _overrides(tmp_path / "a", 3)))
    b = run(load_config(FluxKontextConfig, None, _overrides(tmp_path / "b", 3)))
    assert a.losses == b.losses
    assert all(torch.equal(a.state.lora[k], b.state.lora[k]) for k in a.state.lora)
    files = [load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("a", "b")]
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_cli_rejects_unknown_key_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.flux_kontext_lora", "train", "--train.max_train_step=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "did you mean 'train.max_train_steps'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_predict_cli_with_lora(trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = Path(trained[0].config.logging.output_dir)
    held = scan_pairs(resolve_dataset_path("builtin:toy-invert", heldout=True), None, multiple=16)
    edited = tmp_path / "edited.png"
    main(
        [
            "predict",
            f"--image={held[0].control}",
            "--prompt=invert the picture",
            f"--out={edited}",
            f"--lora={out / 'pytorch_lora_weights.safetensors'}",
            "--num_inference_steps=3",
        ]
    )
    from PIL import Image

    assert Image.open(edited).size == Image.open(held[0].control).size
    # another output size: the control takes it (data.control_size: model = target), or keeps its own (keep)
    sized = {}
    for rule in ("model", "keep"):
        sized[rule] = tmp_path / f"{rule}.png"
        main(["predict", f"--image={held[0].control}", "--prompt=invert the picture", f"--out={sized[rule]}",
              "--num_inference_steps=2", "--height=48", "--width=80", f"--data.control_size={rule}"])  # fmt: skip
        assert Image.open(sized[rule]).size == (80, 48)
    assert not np.array_equal(np.asarray(Image.open(sized["model"])), np.asarray(Image.open(sized["keep"])))
    with pytest.raises(SystemExit) as info:
        main(["predict", "--image=/nonexistent.png", "--prompt=x"])
    assert info.value.code == 2
    assert "input image '/nonexistent.png' does not exist" in capsys.readouterr().err


def test_no_trainer_classes() -> None:
    proc = subprocess.run(
        ["grep", "-rn", "class .*Trainer", "qflux", "recipes"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.stdout == ""
