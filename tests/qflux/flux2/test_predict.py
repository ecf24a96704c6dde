"""qflux's FLUX.2 predict against the pipeline on the same tiny model, images and seed, for each variant
([klein]: ``Flux2KleinPipeline``, CFG; [dev]: ``Flux2Pipeline``, the guidance-distilled transformer's input):
one and two references, guidance off and on, without and with our LoRA (which the pipeline loads with
``load_lora_weights``); the ComfyUI file in BFL's names for every module kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from PIL import Image

from qflux.config.schema import LoraConfig
from qflux.lora.adapter import inject_lora, save_lora
from qflux.models.flux2.loaders import DEV, KLEIN
from qflux.models.flux2.predict import predict as flux2_predict
from qflux.models.flux2.tiny import build_flux2_dev, build_flux2_klein

STEPS = 3
VARIANTS = {
    "klein": (KLEIN, build_flux2_klein, Flux2KleinPipeline, 32),
    "dev": (DEV, build_flux2_dev, Flux2Pipeline, 80),
}
"""variant → (model, tiny builder, pipeline, prompt tokens: [dev]'s hold BFL's system message)."""


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module", params=list(VARIANTS))
def klein(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A tiny FLUX.2 of the variant (seed 2), our models, a LoRA on them (saved for the pipeline), the pipeline,
    and the variant's prediction: ``predict(models, images, prompt, **kw)``."""
    variant, build, pipeline_cls, seq = VARIANTS[request.param]
    path = build(tmp_path_factory.mktemp(request.param), seed=2)
    models = variant.files.load(path, torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"))
    lora = inject_lora(models.transformer, cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    lora = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in lora.items()}
    out = tmp_path_factory.mktemp("klein-lora")
    save_lora(out, models.transformer, lora, dtype=torch.float32, pipeline_cls=pipeline_cls)
    pipe = pipeline_cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)

    def predict(models, images, prompt, **kw):  # type: ignore[no-untyped-def]
        return flux2_predict(models, variant.text, images, prompt, max_sequence_length=seq, **kw)

    return path, models, lora, out, pipe, predict


def _refs(n: int) -> list[Image.Image]:
    return [_image(96, 72, 0), _image(80, 112, 1)][:n]


def _pipe_image(pipe, n: int, guidance: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    seq = 80 if isinstance(pipe, Flux2Pipeline) else 32
    return pipe(image=_refs(n), prompt="make it red", num_inference_steps=STEPS, guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(3), output_type="np",
                max_sequence_length=seq).images[0]  # fmt: skip


@pytest.mark.parametrize(("n", "guidance"), [(1, 1.0), (1, 4.0), (2, 1.0), (2, 4.0)])
def test_predict_equals_the_pipeline(klein, n: int, guidance: float) -> None:
    _, models, _, _, pipe, predict = klein
    ours = predict(models, _refs(n), "make it red", num_inference_steps=STEPS, guidance_scale=guidance, seed=3)
    ref = _pipe_image(pipe, n, guidance)
    assert ours.shape == ref.shape == (64, 96, 3)  # the first reference's size, floored to 16
    assert _mad(ours, ref) <= 1 / 255


@pytest.mark.parametrize(("n", "guidance"), [(1, 4.0), (2, 1.0)])
def test_our_lora_in_the_pipeline_equals_predict_and_moves_the_image(klein, n: int, guidance: float) -> None:
    _, models, lora, out, pipe, predict = klein
    kw = {"num_inference_steps": STEPS, "guidance_scale": guidance, "seed": 3}
    ours = predict(models, _refs(n), "make it red", lora=lora, **kw)
    base = predict(models, _refs(n), "make it red", **kw)
    assert _mad(ours, base) > 5 / 255
    pipe.load_lora_weights(str(out))
    try:
        assert _mad(_pipe_image(pipe, n, guidance), ours) <= 1 / 255
    finally:
        pipe.unload_lora_weights()


# every FLUX.2 module kind ComfyUI names (single blocks' attn.to_out by path: the double blocks' attn.to_out is a list)
ALL = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out", "ff.linear_in",
       "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out", "to_qkv_mlp_proj",
       "single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.1.attn.to_out", "x_embedder",
       "context_embedder", "proj_out", "norm_out.linear", "double_stream_modulation_img.linear",
       "single_stream_modulation.linear", "time_guidance_embed.timestep_embedder.linear_1")  # fmt: skip
GUIDANCE = ("time_guidance_embed.guidance_embedder.linear_1", "time_guidance_embed.guidance_embedder.linear_2")
"""[dev]'s guidance embedder (ComfyUI's guidance_in)."""


def test_the_comfyui_file_has_bfl_names_and_every_update(klein, tmp_path: Path) -> None:
    """Every module kind in BFL's FLUX.2 names (fused double-block q/k/v, linear1/linear2, the final
    modulation's halves in BFL's order); diffusers' FLUX.2 converter and qflux's reader both read it
    back to each module's ΔW."""
    from safetensors.torch import load_file

    from qflux.lora.adapter import lora_scale, read_lora, save_lora_comfyui

    path = klein[0]
    variant = DEV if klein[1].transformer.config.guidance_embeds else KLEIN
    tr = variant.files.load(path, torch.float32).transformer
    guided = bool(tr.config.guidance_embeds)
    lora = inject_lora(tr, LoraConfig(r=2, lora_alpha=4, target_modules=ALL + GUIDANCE * guided), seed=0)
    g = torch.Generator().manual_seed(7)
    lora = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in lora.items()}
    comfy = save_lora_comfyui(tmp_path, tr, lora, dtype=torch.float32, naming="flux2")
    keys = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in load_file(comfy) if k.endswith(".weight")}
    assert {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_mlp.0",
            "double_blocks.0.txt_mlp.2", "single_blocks.1.linear1", "single_blocks.0.linear2", "img_in", "txt_in",
            "final_layer.linear", "final_layer.adaLN_modulation.1", "double_stream_modulation_img.lin",
            "single_stream_modulation.lin", "time_in.in_layer"} <= keys  # fmt: skip
    assert guided == ({"guidance_in.in_layer", "guidance_in.out_layer"} <= keys)
    scale = lora_scale(tr)
    want = {}
    for k in lora:
        if ".lora_A." in k:
            module = k.split(".lora_A.")[0]
            want[module] = scale * lora[k.replace(".lora_A.", ".lora_B.")].double() @ lora[k].double()
    ours = read_lora(tr, comfy, naming="flux2", pipeline_cls=type(klein[4]), what="test")
    assert set(ours) == set(want)
    for module, (a, b) in ours.items():
        torch.testing.assert_close(b.double() @ a.double(), want[module], rtol=1e-5, atol=1e-6)
    # diffusers' own FLUX.2 converter (ai-toolkit's BFL-named lora_A / lora_B) maps the names back
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers

    sd = load_file(comfy)
    aitk = {}
    for k, t in sd.items():
        if k.endswith(".lora_down.weight"):
            stem = k.removesuffix(".lora_down.weight")
            up, alpha = sd[f"{stem}.lora_up.weight"], float(sd[f"{stem}.alpha"])
            aitk[f"{stem}.lora_A.weight"], aitk[f"{stem}.lora_B.weight"] = t, up * (alpha / t.shape[0])
    theirs = _convert_non_diffusers_flux2_lora_to_diffusers(aitk)
    for module, delta in want.items():
        if module == "norm_out.linear":  # diffusers' converter keeps BFL's (shift, scale) order here
            continue
        a, b = theirs[f"transformer.{module}.lora_A.weight"], theirs[f"transformer.{module}.lora_B.weight"]
        torch.testing.assert_close(b.double() @ a.double(), delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_comfyui_file_names_every_module_as_comfyui_maps_it_and_reads_back(klein, kind: str) -> None:
    """LoKr / LoHa on every linear layer: the time embedder and the shared modulations, which ComfyUI knows by no
    FLUX.2 diffusers name, are written under their BFL names (diffusion_model.time_in.in_layer, ...), and
    ``predict --lora`` reads the file back to the in-process image."""
    from safetensors.torch import load_file

    from qflux.lora.adapter import COMFYUI_WEIGHT_NAME, load_lora_file, save_lora_comfyui

    path, predict = klein[0], klein[5]
    variant = DEV if klein[1].transformer.config.guidance_embeds else KLEIN
    models = variant.files.load(path, torch.float32)
    lora = inject_lora(models.transformer, LoraConfig(kind=kind, r=2, lora_alpha=4, target_modules=("all-linear",)),
                       seed=0)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    lora = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in lora.items()}
    out = path.parent / f"lora-{kind}"
    save_lora_comfyui(out, models.transformer, lora, dtype=torch.float32, naming="flux2")
    stems = {k.rsplit(".", 1)[0] for k in load_file(out / COMFYUI_WEIGHT_NAME)}
    five = ("double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
            "time_in.in_layer", "time_in.out_layer")  # fmt: skip
    assert {f"diffusion_model.{m}" for m in five} <= stems
    assert not any("time_guidance_embed" in s or "stream_modulation_img_linear" in s for s in stems)
    kw = {"num_inference_steps": STEPS, "guidance_scale": 1.0, "seed": 3}
    ours = predict(models, _refs(1), "make it red", lora=lora, **kw)
    fresh = variant.files.load(path, torch.float32)
    load_lora_file(fresh.transformer, out / COMFYUI_WEIGHT_NAME, naming="flux2", pipeline_cls=type(klein[4]))
    assert _mad(predict(fresh, _refs(1), "make it red", **kw), ours) <= 1 / 255
    assert _mad(ours, predict(models, _refs(1), "make it red", **kw)) > 5 / 255  # the adapter moves the image
