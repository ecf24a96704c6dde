"""The FLUX.2 recipes, [klein] and [dev], each on a tiny model built with a seed no other test uses: a LoRA trained
by ``python -m recipes.flux2_<variant>_lora`` on samples with two reference images, whose ``predict`` image equals
the pipeline's (``Flux2KleinPipeline``, ``Flux2Pipeline``) within 1/255 with and without it (the pipeline loading it
with ``load_lora_weights``, where it moves the image), and its ComfyUI file reads back to the same image; cached
training equals uncached, a resumed run equals a straight one bit for bit; plan and check run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.flux2.tiny import build_flux2_dev, build_flux2_klein
from recipes import flux2_dev_lora, flux2_klein_lora

STEPS = 3
SEQ = {"klein": 32, "dev": 80}
"""Prompt tokens: [dev]'s hold BFL's system message (52 to 56 tokens with a short prompt in the tiny tokenizer)."""
RECIPES = {"klein": flux2_klein_lora, "dev": flux2_dev_lora}


@pytest.fixture(scope="module", params=["klein", "dev"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    build = {"klein": build_flux2_klein, "dev": build_flux2_dev}[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param), seed=11)


def _pairs(root: Path) -> Path:
    """Four samples, each with two references: the control and its mirror."""
    make_synthetic_pairs(root, 4, seed=5)
    for control in sorted((root / "control_images").glob("*.png")):
        ImageOps.mirror(Image.open(control)).save(control.with_name(f"{control.stem}_control_1.png"))
    return root


def _args(variant: str, model: Path, data: Path, out: Path, *more: str) -> list[str]:
    return ["train", f"--model.pretrained_model_name_or_path={model}", "--model.dtype=float32",
            f"--data.dataset_path={data}", f"--logging.output_dir={out}", "--train.max_train_steps=6",
            f"--model.max_sequence_length={SEQ[variant]}", "--logging.write_sample=false",
            f"--cache.cache_dir={out.parent / 'c'}", "--model.lora.init_lora_weights=false", "--optimizer.lr=0.3",
            *more]  # fmt: skip


def _refs(tmp: Path) -> list[Path]:
    rng = np.random.default_rng(9)
    paths = []
    for i, (w, h) in enumerate(((96, 80), (64, 112))):
        p = tmp / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_a_trained_lora_predicts_as_the_pipeline_with_one_and_two_references(
    model: tuple[str, Path], tmp_path: Path
) -> None:
    import diffusers

    variant, model_dir = model
    main, seq = RECIPES[variant].main, SEQ[variant]
    out = tmp_path / "run"
    main(_args(variant, model_dir, _pairs(tmp_path / "data"), out))
    lora = out / "pytorch_lora_weights.safetensors"
    comfy = out / "pytorch_lora_weights_comfyui.safetensors"
    assert lora.is_file() and comfy.is_file()
    refs = _refs(tmp_path)
    common = [f"--image={refs[0]},{refs[1]}", "--prompt=invert the colors", f"--num_inference_steps={STEPS}",
              "--seed=4", f"--model.pretrained_model_name_or_path={model_dir}", "--model.dtype=float32",
              f"--model.max_sequence_length={seq}"]  # fmt: skip
    main(["predict", *common, f"--out={tmp_path / 'base.png'}"])
    main(["predict", *common, f"--out={tmp_path / 'lora.png'}", f"--lora={lora}"])
    main(["predict", *common, f"--out={tmp_path / 'comfy.png'}", f"--lora={comfy}"])
    one = [f"--image={refs[0]}", *common[1:]]
    main(["predict", *one, f"--out={tmp_path / 'base1.png'}"])
    main(["predict", *one, f"--out={tmp_path / 'lora1.png'}", f"--lora={lora}"])
    main(["predict", *common, f"--out={tmp_path / 'target.png'}", "--data.control_size=target", "--height=64",
          "--width=96"])  # fmt: skip
    assert Image.open(tmp_path / "target.png").size == (96, 64)
    ours = {
        k: np.asarray(Image.open(tmp_path / f"{k}.png")) / 255.0 for k in ("base", "lora", "comfy", "base1", "lora1")
    }
    assert _mad(ours["comfy"], ours["lora"]) <= 1 / 255  # the ComfyUI file reads back to the same LoRA
    pipeline = {"klein": diffusers.Flux2KleinPipeline, "dev": diffusers.Flux2Pipeline}[variant]
    pipe = pipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def pipeline_image(n: int = 2) -> np.ndarray:
        images = [Image.open(p).convert("RGB") for p in refs[:n]]
        result = pipe(
            image=images,
            prompt="invert the colors",
            num_inference_steps=STEPS,
            guidance_scale=4.0,
            generator=torch.Generator("cpu").manual_seed(4),
            output_type="np",
            max_sequence_length=seq,
        )
        return np.round(result.images[0] * 255) / 255  # as the PNG stores it

    base = pipeline_image()
    assert ours["base"].shape == base.shape == (80, 96, 3)
    assert _mad(ours["base"], base) <= 1 / 255
    assert _mad(ours["base1"], pipeline_image(1)) <= 1 / 255
    pipe.load_lora_weights(str(out))
    with_lora = pipeline_image()
    assert _mad(ours["lora"], with_lora) <= 1 / 255
    assert _mad(with_lora, base) > 5 / 255  # the LoRA moves the image
    assert _mad(ours["lora1"], pipeline_image(1)) <= 1 / 255


def test_cached_training_equals_uncached_resumes_and_plan_and_check_run(model: tuple[str, Path], tmp_path: Path,
                                                                        capsys) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    from qflux.config.parse import load_config

    variant, model_dir = model
    recipe = RECIPES[variant]
    data = _pairs(tmp_path / "data")

    def run(out: str, cached: bool, steps: int = 3, **more: object):  # type: ignore[no-untyped-def]
        overrides = {"model.pretrained_model_name_or_path": str(model_dir), "model.dtype": "float32",
                     "data.dataset_path": str(data), "logging.output_dir": str(tmp_path / out),
                     "train.max_train_steps": steps, "train.checkpointing_steps": 2,
                     "model.max_sequence_length": SEQ[variant], "logging.write_sample": cached,
                     "cache.cache_dir": str(tmp_path / "cache"), "cache.use_cache": cached,
                     "validation.enabled": cached, "validation.dataset_path": str(data),
                     "validation.validation_steps": 2, "validation.num_inference_steps": 1,
                     "validation.num_validation_samples": 2, **more}  # fmt: skip
        return recipe.train(load_config(recipe.SPEC.family.config, None, overrides))

    plain, cached = run("plain", False), run("cached", True)
    run("resumed", True, steps=2)
    resumed = run("resumed", True, resume_from_checkpoint="latest")
    assert plain.losses == cached.losses == resumed.losses and all(np.isfinite(plain.losses))
    grids = sorted((tmp_path / "cached" / "validation").glob("*.png"))  # validation through the cache
    assert grids and (tmp_path / "cached" / "sample.png").is_file()
    for other in (cached, resumed):
        assert all(torch.equal(plain.state.lora[k], other.state.lora[k]) for k in plain.state.lora)
    recipe.main(["plan", "--vram=24", f"--model.pretrained_model_name_or_path={model_dir}"])  # fits: no exit status
    assert "fits:" in capsys.readouterr().out
    recipe.main(["check", f"--model.pretrained_model_name_or_path={model_dir}", f"--data.dataset_path={data}"])
