"""The LoRA toolbox (``python -m qflux.lora``): resize, extract and post-hoc EMA as maths (hypothesis) and on the
files a real run writes, read back by qflux's own LoRA reader; inspect; the refusals."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from qflux.config.parse import load_config
from qflux.lora.__main__ import main
from qflux.lora.adapter import EMA_WEIGHT_NAME, LORA_WEIGHT_NAME, read_lora
from qflux.lora.original_names import to_original_names
from qflux.lora.toolbox import TOOL_KEY, read_lora_file
from qflux.lora.tools import extract, post_hoc_ema, resize
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.flux_kontext.loaders import load_flux_kontext
from qflux.optim.adamw import ema_update
from qflux.weights.quantize import Float8StorageLinear
from recipes.flux_kontext_lora import train


def _pair(seed: int, rank: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, n_in, generator=g), torch.randn(n_out, rank, generator=g)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), rank=st.integers(1, 8), n_in=st.integers(8, 40), n_out=st.integers(8, 40),
       extra=st.integers(0, 4))  # fmt: skip
def test_resize_to_the_rank_or_above_keeps_the_update_and_below_is_the_best_approximation(
    seed, rank, n_in, n_out, extra
) -> None:
    a, b = _pair(seed, rank, n_in, n_out)
    delta = b @ a
    (a2, b2), kept = resize(a, b, rank + extra)
    assert a2.shape == (rank + extra, n_in) and b2.shape == (n_out, rank + extra)
    assert torch.allclose(b2 @ a2, delta, atol=1e-5 * max(1.0, float(delta.abs().max())))
    assert kept == pytest.approx(1.0)
    if rank > 1:  # Eckart–Young: the truncated SVD of ΔW itself
        (a1, b1), kept1 = resize(a, b, rank - 1)
        u, s, vh = torch.linalg.svd(delta.double())
        best = (u[:, : rank - 1] * s[: rank - 1]) @ vh[: rank - 1]
        assert torch.allclose((b1 @ a1).double(), best, atol=1e-4 * float(s[0]))
        assert kept1 == pytest.approx(float((s[: rank - 1] ** 2).sum() / (s**2).sum()), rel=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), rank=st.integers(1, 6))
def test_extract_recovers_an_update_of_its_rank(seed, rank) -> None:
    a, b = _pair(seed, rank, 32, 24)
    base = torch.randn(24, 32, generator=torch.Generator().manual_seed(seed + 1))
    (a2, b2), kept = extract(base, base + b @ a, rank)
    assert torch.allclose(b2 @ a2, b @ a, atol=1e-4 * max(1.0, float((b @ a).abs().max())))
    assert kept == pytest.approx(1.0)


@settings(max_examples=30, deadline=None)
@given(decay=st.floats(0.0, 0.999), gaps=st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_post_hoc_ema_is_the_in_run_average_with_each_snapshot_held(decay, gaps) -> None:
    """Over a gap of g steps the snapshot is held: g in-run updates e ← d·e + (1 − d)·θ with θ constant."""
    steps = [1]
    for g in gaps:
        steps.append(steps[-1] + g)
    snaps = [{"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(i))} for i in range(len(steps))]
    expected = dict(snaps[0])
    for i in range(1, len(steps)):
        for _ in range(steps[i] - steps[i - 1]):
            expected = ema_update(expected, snaps[i], decay)
    assert torch.allclose(post_hoc_ema(steps, snaps, decay)["w"], expected["w"], atol=1e-6)


@pytest.fixture(scope="module")
def run(tiny_flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run with the LoRA's moving average, a checkpoint at every step, all kept."""
    out = tmp_path_factory.mktemp("run")
    train(load_config(FluxKontextConfig, None, {
        "model.pretrained_model_name_or_path": str(tiny_flux_dir), "model.dtype": "float32",
        "model.max_sequence_length": 8, "train.max_train_steps": 4, "train.checkpointing_steps": 1,
        "train.checkpoints_total_limit": None, "train.ema_decay": 0.8, "logging.output_dir": str(out),
        "logging.write_sample": False, "logging.report_to": "none",
    }))  # fmt: skip
    return out


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    return {s: b @ a for s, (a, b) in read_lora_file(path).layers.items()}


@pytest.mark.parametrize("name", [LORA_WEIGHT_NAME, "pytorch_lora_weights_comfyui.safetensors"])
def test_resize_a_runs_files_at_their_rank_leaves_every_update(
    run: Path, tiny_flux_dir: Path, tmp_path: Path, name: str, capsys
) -> None:
    src = run / name
    rank = max(a.shape[0] for a, _ in read_lora_file(src).layers.values())  # ComfyUI's fused layers: the parts' sum
    main(["resize", str(src), f"--rank={rank}", f"--out={tmp_path / 'same.safetensors'}"])
    assert "energy kept 100.0000%" in capsys.readouterr().out
    before, after = _deltas(src), _deltas(tmp_path / "same.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.allclose(after[k], before[k], atol=1e-5) for k in before)
    # the model's own reader (every spelling, ComfyUI's fused layers split into their parts) sees the same updates
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir / "transformer")
    read = partial(read_lora, transformer, naming="flux", pipeline_cls=FluxKontextPipeline, what="test")
    model_before, model_after = read(src), read(tmp_path / "same.safetensors")
    assert model_before.keys() == model_after.keys()
    for m, (a, b) in model_before.items():
        assert torch.allclose(model_after[m][1] @ model_after[m][0], b @ a, atol=1e-5)
    main(["resize", str(src), "--rank=1", f"--out={tmp_path / 'one.safetensors'}"])
    assert {a.shape[0] for a, _ in read_lora_file(tmp_path / "one.safetensors").layers.values()} == {1}
    made = json.loads(load_metadata(tmp_path / "one.safetensors")[TOOL_KEY])
    assert made == {"verb": "resize", "input": name, "rank": 1}


def load_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def test_post_hoc_ema_of_every_checkpoint_is_the_in_run_average(run: Path, tmp_path: Path) -> None:
    """The in-run average starts at the initial LoRA θ₀, the post-hoc one at the first checkpoint's θ₁: after N steps
    they differ by exactly d^N·(θ₀ − θ₁) (θ₀ recovered from checkpoint 1's in-run average e₁ = d·θ₀ + (1 − d)·θ₁)."""
    d, n = 0.8, 4
    dirs = [run / f"checkpoint-{s}" for s in range(1, n + 1)]
    main(["ema", *map(str, reversed(dirs)), f"--decay={d}", f"--out={tmp_path / 'ema.safetensors'}"])
    post = load_file(tmp_path / "ema.safetensors")
    in_run = load_file(run / EMA_WEIGHT_NAME)
    first = load_file(dirs[0] / "train_state.safetensors")
    theta1 = load_file(dirs[0] / LORA_WEIGHT_NAME)
    assert post.keys() == in_run.keys()
    for key, value in post.items():
        internal = key.removeprefix("transformer.").replace(".lora_A.", ".lora_A.default.").replace(
            ".lora_B.", ".lora_B.default.")  # fmt: skip
        theta0 = (first[f"ema/{internal}"] - (1 - d) * theta1[key]) / d
        assert torch.allclose(value + d**n * (theta0 - theta1[key]), in_run[key], atol=1e-6)


def test_extract_from_two_transformers(tiny_flux_dir: Path, tmp_path: Path) -> None:
    from qflux.lora.toolbox import read_weights

    weights = read_weights(tiny_flux_dir / "transformer")
    name = next(k for k, v in weights.items() if v.ndim == 2 and k.endswith("to_q.weight"))
    a, b = _pair(0, 2, weights[name].shape[1], weights[name].shape[0])
    tuned = dict(weights) | {name: weights[name] + 0.01 * (b @ a)}
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    main(["extract", f"--base={tiny_flux_dir / 'transformer'}", f"--tuned={tmp_path / 'tuned.safetensors'}",
          "--rank=2", f"--out={tmp_path / 'x.safetensors'}"])  # fmt: skip
    (stem, delta), *rest = _deltas(tmp_path / "x.safetensors").items()
    assert not rest and stem == "transformer." + name.removesuffix(".weight")
    assert torch.allclose(delta, 0.01 * (b @ a), atol=1e-4)


def test_inspect_and_the_refusals(run: Path, tmp_path: Path, capsys) -> None:
    main(["inspect", str(run / LORA_WEIGHT_NAME)])
    out = capsys.readouterr().out
    assert "kind      lora, diffusers names" in out and "attn.to_q" in out and "‖ΔW‖_F" in out
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "text.safetensors").write_text("not a file of tensors")
    for argv, message in [
        (["inspect", str(tmp_path / "other.safetensors")], "holds no LoRA tensors"),
        (["inspect", str(tmp_path / "text.safetensors")], "is not a readable .safetensors file"),
        (["resize", str(run / LORA_WEIGHT_NAME), "--rank=2", f"--out={run / LORA_WEIGHT_NAME}"], "never replaced"),
        (["ema", str(run), "--decay=0.9", f"--out={tmp_path / 'e.safetensors'}"], "not a checkpoint-<step> folder"),
        (["ema", str(run / "checkpoint-1"), "--decay=1.5", f"--out={tmp_path / 'e.safetensors'}"], "in [0, 1)"),
        (
            [
                "convert",
                str(run / LORA_WEIGHT_NAME),
                "--to=comfyui",
                "--family=flux_kontext",
                f"--model={tmp_path}",
                f"--out={tmp_path / 'c.safetensors'}",
            ],
            "neither a diffusers folder",
        ),
        (["inspect", str(run / LORA_WEIGHT_NAME), "--family=flux_kontext"], "both --family and --model"),
        (["frobnicate"], ""),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_convert_round_trips_bit_for_bit_and_matches_the_runs_comfyui_file(
    run: Path, tiny_flux_dir: Path, tmp_path: Path
) -> None:
    model = ["--family=flux_kontext", f"--model={tiny_flux_dir}"]
    files = {n: tmp_path / f"{n}.safetensors" for n in ("c1", "d1", "c2", "d2")}
    main(["convert", str(run / LORA_WEIGHT_NAME), "--to=comfyui", *model, f"--out={files['c1']}"])
    main(["convert", str(files["c1"]), "--to=diffusers", *model, f"--out={files['d1']}"])
    main(["convert", str(files["d1"]), "--to=comfyui", *model, f"--out={files['c2']}"])
    main(["convert", str(files["c2"]), "--to=diffusers", *model, f"--out={files['d2']}"])
    for a, b in (("c1", "c2"), ("d1", "d2")):
        x, y = load_file(files[a]), load_file(files[b])
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # the same updates as the run's own ComfyUI file, every fused layer included
    ours, theirs = _deltas(run / "pytorch_lora_weights_comfyui.safetensors"), _deltas(files["c1"])
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    with pytest.raises(SystemExit) as info:
        main(["convert", str(run / LORA_WEIGHT_NAME), "--to=comfyui", "--family=sdxl", f"--model={tiny_flux_dir}",
              f"--out={tmp_path / 'x.safetensors'}"])  # fmt: skip
    assert info.value.code == 2


def test_inspect_reports_what_each_loader_applies_and_names_a_mistyped_key(
    run: Path, tiny_flux_dir: Path, tmp_path: Path, capsys
) -> None:
    model = ["--family=flux_kontext", f"--model={tiny_flux_dir}"]
    for name in (LORA_WEIGHT_NAME, "pytorch_lora_weights_comfyui.safetensors"):
        main(["inspect", str(run / name), *model])
        out = capsys.readouterr().out
        assert out.count("drops 0") == (3 if name == LORA_WEIGHT_NAME else 2), out
    sd = load_file(run / LORA_WEIGHT_NAME)
    typo = {k.replace("transformer.transformer_blocks.0.attn.to_q.", "transformer.transformer_blocks.0.attn.to_qq."): v
            for k, v in sd.items()}  # fmt: skip
    save_file(typo, str(tmp_path / "typo.safetensors"), metadata=load_metadata(run / LORA_WEIGHT_NAME))
    main(["inspect", str(tmp_path / "typo.safetensors"), *model])
    lines = [line for line in capsys.readouterr().out.splitlines() if "drops 1: " in line]
    assert len(lines) == 3 and all("transformer.transformer_blocks.0.attn.to_qq" in line for line in lines)


def test_merge_bakes_the_lora_in_and_the_pipeline_loads_the_file(
    run: Path, tiny_flux_dir: Path, tmp_path: Path
) -> None:
    """The ComfyUI file (fused layers) merged into the tiny model: FluxKontextPipeline with the merged transformer
    edits as the pipeline with the LoRA loaded (float32: 1e-5; bfloat16: within its rounding)."""
    from PIL import Image

    control = Image.new("RGB", (32, 32), (200, 40, 90))

    def edit(pipe) -> np.ndarray:  # type: ignore[no-untyped-def]
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator("cpu").manual_seed(0)
        return pipe(image=control, prompt="invert", num_inference_steps=2, guidance_scale=2.5, generator=gen,
                    output_type="np", _auto_resize=False, max_sequence_length=8).images[0]  # fmt: skip

    pipe = FluxKontextPipeline.from_pretrained(tiny_flux_dir, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(run), weight_name=LORA_WEIGHT_NAME)
    with_lora = edit(pipe)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):  # measured 1.5e-6 and 2.5e-3; the LoRA moves 4.6e-2
        out = tmp_path / f"merged_{dtype}.safetensors"
        main(["merge", str(run / "pytorch_lora_weights_comfyui.safetensors"), f"--into={tiny_flux_dir}",
              "--family=flux_kontext", f"--out={out}", f"--dtype={dtype}"])  # fmt: skip
        merged = FluxTransformer2DModel.from_single_file(str(out), config=str(tiny_flux_dir), subfolder="transformer",
                                                         torch_dtype=torch.float32)  # fmt: skip
        got = edit(FluxKontextPipeline.from_pretrained(tiny_flux_dir, transformer=merged, torch_dtype=torch.float32))
        assert np.abs(got - with_lora).max() <= tol, (dtype, np.abs(got - with_lora).max())
    # in BFL names: the same tensors, as qflux.lora.original_names lays them out (tests/qflux/test_original_names.py)
    comfy = run / "pytorch_lora_weights_comfyui.safetensors"
    main(["merge", str(comfy), f"--into={tiny_flux_dir}", "--family=flux_kontext", "--dtype=float32",
          "--names=original", f"--out={tmp_path / 'bfl.safetensors'}"])  # fmt: skip
    bfl = load_file(tmp_path / "bfl.safetensors")
    want = to_original_names(load_file(tmp_path / "merged_float32.safetensors"), "flux")
    assert bfl.keys() == want.keys() and all(torch.equal(bfl[k], want[k]) for k in bfl)
    # fp8 (ComfyUI's fp8-scaled layout): qflux's transformer_file keeps it fp8, each weight within fp8's rounding
    main(["merge", str(comfy), f"--into={tiny_flux_dir}", "--family=flux_kontext", "--dtype=fp8",
          f"--out={tmp_path / 'fp8.safetensors'}"])  # fmt: skip
    full = load_file(tmp_path / "merged_float32.safetensors")
    models = load_flux_kontext(tiny_flux_dir, torch.float32, include=("transformer",),
                               files={"transformer": tmp_path / "fp8.safetensors"})  # fmt: skip
    stored = {n: m for n, m in models.transformer.named_modules() if isinstance(m, Float8StorageLinear)}
    assert len(stored) == sum(1 for k, v in full.items() if k.endswith(".weight") and v.ndim == 2)
    for name, m in stored.items():
        w = m.weight.float() * m.weight_scale
        assert (w - full[f"{name}.weight"]).abs().max() <= full[f"{name}.weight"].abs().max() / 8  # e4m3: 3 bits


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_convert_a_lycoris_file_is_the_runs_other_file(tiny_flux_dir: Path, tmp_path: Path, kind: str, capsys) -> None:
    out = tmp_path / "run"
    train(load_config(FluxKontextConfig, None, {
        "model.pretrained_model_name_or_path": str(tiny_flux_dir), "model.dtype": "float32",
        "model.max_sequence_length": 8, "train.max_train_steps": 1, "model.lora.kind": kind,
        "logging.output_dir": str(out), "logging.write_sample": False, "logging.report_to": "none",
    }))  # fmt: skip
    model = ["--family=flux_kontext", f"--model={tiny_flux_dir}"]
    pairs = {"comfyui": (LORA_WEIGHT_NAME, "pytorch_lora_weights_comfyui.safetensors"),
             "diffusers": ("pytorch_lora_weights_comfyui.safetensors", LORA_WEIGHT_NAME)}  # fmt: skip
    main(["inspect", str(out / LORA_WEIGHT_NAME)])
    assert f"kind      {kind}, " in capsys.readouterr().out
    for to, (src, want) in pairs.items():
        main(["convert", str(out / src), f"--to={to}", *model, f"--out={tmp_path / to}.safetensors"])
        got, expected = load_file(tmp_path / f"{to}.safetensors"), load_file(out / want)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize("kind", ["lokr", "loha", "dora"])
def test_merge_bakes_in_every_kind_as_predict_applies_it(tiny_flux_dir: Path, tmp_path: Path, kind: str) -> None:
    from PIL import Image

    from recipes.flux_kontext_lora import main as recipe

    out = tmp_path / "run"
    train(load_config(FluxKontextConfig, None, {
        "model.pretrained_model_name_or_path": str(tiny_flux_dir), "model.dtype": "float32",
        "model.max_sequence_length": 8, "train.max_train_steps": 2, "model.lora.kind": kind, "optimizer.lr": 0.05,
        "train.lora_format": "diffusers", "logging.output_dir": str(out), "logging.write_sample": False,
        "logging.report_to": "none",
    }))  # fmt: skip
    main(["merge", str(out / LORA_WEIGHT_NAME), f"--into={tiny_flux_dir}", "--family=flux_kontext", "--dtype=float32",
          f"--out={tmp_path / 'merged.safetensors'}"])  # fmt: skip
    Image.new("RGB", (32, 32), (200, 40, 90)).save(tmp_path / "c.png")
    common = [f"--image={tmp_path / 'c.png'}", "--prompt=invert", "--num_inference_steps=2", "--model.dtype=float32",
              f"--model.pretrained_model_name_or_path={tiny_flux_dir}", "--model.max_sequence_length=8"]  # fmt: skip
    images = {}
    for name, extra in {"base": [], "adapter": [f"--lora={out / LORA_WEIGHT_NAME}"],
                        "merged": [f"--model.transformer_file={tmp_path / 'merged.safetensors'}"]}.items():  # fmt: skip
        recipe(["predict", *common, *extra, f"--out={tmp_path / name}.png"])
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert np.abs(images["merged"] - images["adapter"]).max() <= 1
    assert np.abs(images["adapter"] - images["base"]).max() > 1  # the adapter moved the image
