"""LoRA formats: ours saved as ComfyUI (native Flux names, ``.alpha``) keeps every ΔW, loads in
diffusers through its ComfyUI/kohya converter and gives our predict's images; ``pretrained_weight``
reads diffusers, ComfyUI and kohya files back to the same adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from qflux.config.errors import QfluxError
from qflux.config.schema import LoraConfig
from qflux.lora.adapter import (
    COMFYUI_WEIGHT_NAME,
    inject_lora,
    lora_from_file,
    lora_scale,
    lora_to_diffusers,
    save_lora,
    save_lora_comfyui,
)
from qflux.lora.formats import comfyui_to_kohya, module_out_features, to_comfyui
from qflux.models.flux_kontext.loaders import FLUX_KONTEXT, load_flux_kontext
from qflux.models.flux_kontext.predict import predict
from qflux.weights.loading import load_part

STEPS = 3
# every module kind of both block types, as diffusers names them
ALL = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear",
)  # fmt: skip
# diffusers' converter sizes a single block's fused linear1 for the real model (width 3072), so the
# round trip through diffusers on the tiny model adapts the double blocks (fused qkv included) and
# the single blocks' linear2; the conversion of linear1 itself is checked by the ΔW test.
ROUND_TRIP = (
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "to_out.0", "add_k_proj", "to_add_out", "ff.net.2", "ff_context.net.0.proj", "single_transformer_blocks.0.proj_out",
)  # fmt: skip


def _trained(transformer, targets: tuple[str, ...], r: int = 4, alpha: float = 8.0) -> dict[str, torch.Tensor]:
    lora = inject_lora(transformer, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets), seed=0)
    g = torch.Generator().manual_seed(1)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in lora.items()}


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * b.double() @ a.double()


def test_comfyui_conversion_keeps_every_delta(tiny_flux_dir: Path) -> None:
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    lora = _trained(tr, ALL)
    sd = lora_to_diffusers(tr, lora, torch.float32)
    scale = lora_scale(tr)
    comfy = to_comfyui(sd, scale=scale, out_features=module_out_features(tr), naming="flux")
    assert all(k.startswith("diffusion_model.") for k in comfy)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in comfy} == {
        "lora_down",
        "lora_up",
        "alpha",
    }
    # fused layers: the parts' ΔW are the row blocks of the fused ΔW
    fused = {}
    for key in comfy:
        if key.endswith(".alpha"):
            m = key.removesuffix(".alpha")
            down, up = comfy[f"{m}.lora_down.weight"], comfy[f"{m}.lora_up.weight"]
            fused[m.removeprefix("diffusion_model.")] = _delta(down, up, float(comfy[key]) / down.shape[0])
    d_model = tr.config.num_attention_heads * tr.config.attention_head_dim
    for blk in range(tr.config.num_layers):
        qkv = fused[f"double_blocks.{blk}.img_attn.qkv"]
        for part, name in enumerate(("to_q", "to_k", "to_v")):
            a = sd[f"transformer_blocks.{blk}.attn.{name}.lora_A.weight"]
            b = sd[f"transformer_blocks.{blk}.attn.{name}.lora_B.weight"]
            torch.testing.assert_close(qkv[part * d_model : (part + 1) * d_model], _delta(a, b, scale))
        a, b = (
            sd[f"transformer_blocks.{blk}.ff.net.2.lora_A.weight"],
            sd[f"transformer_blocks.{blk}.ff.net.2.lora_B.weight"],
        )
        torch.testing.assert_close(fused[f"double_blocks.{blk}.img_mlp.2"], _delta(a, b, scale))
    for blk in range(tr.config.num_single_layers):
        lin1 = fused[f"single_blocks.{blk}.linear1"]
        mlp = tr.get_submodule(f"single_transformer_blocks.{blk}.proj_mlp").base_layer.out_features
        assert lin1.shape[0] == 3 * d_model + mlp
        for part, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
            a = sd[f"single_transformer_blocks.{blk}.{name}.lora_A.weight"]
            b = sd[f"single_transformer_blocks.{blk}.{name}.lora_B.weight"]
            rows = slice(part * d_model, part * d_model + b.shape[0])
            torch.testing.assert_close(lin1[rows], _delta(a, b, scale))
    assert "final_layer.linear" in fused  # the top-level proj_out


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def _pipe_image(pipe) -> np.ndarray:
    return pipe(
        image=_image(),
        prompt="invert the colors",
        height=48,
        width=64,
        max_area=48 * 64,
        _auto_resize=False,
        guidance_scale=2.5,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(0),
        max_sequence_length=64,
        output_type="np",
    ).images[0]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def saved(tiny_flux_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A trained-looking LoRA saved in both formats (and kohya), with our predict's image."""
    out = tmp_path_factory.mktemp("formats")
    models = load_flux_kontext(tiny_flux_dir, torch.float32)
    lora = _trained(models.transformer, ROUND_TRIP)
    save_lora(out, models.transformer, lora, dtype=torch.float32, pipeline_cls=FluxKontextPipeline)
    comfy = save_lora_comfyui(out, models.transformer, lora, dtype=torch.float32, naming="flux")
    kohya = out / "kohya.safetensors"
    save_file(comfyui_to_kohya(load_file(comfy)), str(kohya))
    kw = {"num_inference_steps": STEPS, "max_sequence_length": 64}
    ours = predict(models, _image(), "invert the colors", guidance_scale=2.5, lora=lora, **kw)
    base = predict(models, _image(), "invert the colors", guidance_scale=2.5, **kw)
    return out, comfy, kohya, lora, ours, base


def test_comfyui_file_loads_in_diffusers_and_gives_our_images(tiny_flux_dir: Path, saved) -> None:
    out, comfy, _, _, ours, base = saved
    assert comfy.name == COMFYUI_WEIGHT_NAME
    assert _mad(ours, base) > 5 / 255  # the LoRA really changes the image
    pipe = FluxKontextPipeline.from_pretrained(tiny_flux_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out), weight_name=COMFYUI_WEIGHT_NAME)
    assert _mad(_pipe_image(pipe), ours) <= 1 / 255


@pytest.mark.parametrize("kind", ["diffusers", "comfyui", "kohya"])
def test_pretrained_weight_reads_every_format_to_the_same_adapter(tiny_flux_dir: Path, saved, kind: str) -> None:
    out, comfy, kohya, lora, _, _ = saved
    path = {"diffusers": out / "pytorch_lora_weights.safetensors", "comfyui": comfy, "kohya": kohya}[kind]
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    init = inject_lora(tr, LoraConfig(r=4, lora_alpha=8, target_modules=ROUND_TRIP), seed=5)
    got = lora_from_file(tr, path, init, naming="flux", pipeline_cls=FluxKontextPipeline)
    scale = lora_scale(tr)
    for name in lora:
        if ".lora_A." in name:
            b = name.replace(".lora_A.", ".lora_B.")
            torch.testing.assert_close(
                _delta(got[name], got[b], scale), _delta(lora[name], lora[b], scale), rtol=1e-5, atol=1e-6
            )


def test_pretrained_weight_errors_name_the_file_and_the_fix(tiny_flux_dir: Path, saved, tmp_path: Path) -> None:
    out = saved[0]
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    init = inject_lora(tr, LoraConfig(r=2, lora_alpha=2, target_modules=ROUND_TRIP), seed=0)
    with pytest.raises(QfluxError, match=r"has rank 4.*set model\.lora\.r"):
        lora_from_file(
            tr, out / "pytorch_lora_weights.safetensors", init, naming="flux", pipeline_cls=FluxKontextPipeline
        )
    with pytest.raises(QfluxError, match="does not exist"):
        lora_from_file(tr, tmp_path / "nope.safetensors", init, naming="flux", pipeline_cls=FluxKontextPipeline)
    narrow = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    init = inject_lora(narrow, LoraConfig(r=4, lora_alpha=8, target_modules=("to_out.0",)), seed=0)
    with pytest.raises(QfluxError, match=r"outside model\.lora\.target_modules"):
        lora_from_file(
            narrow, out / "pytorch_lora_weights.safetensors", init, naming="flux", pipeline_cls=FluxKontextPipeline
        )


@pytest.mark.parametrize("kind", ["diffusers", "comfyui", "kohya"])
def test_every_module_reads_back_at_a_width_the_real_model_does_not_have(tmp_path: Path, kind: str) -> None:
    """Every Flux module kind (the final modulation too, whose halves BFL orders shift-first) through
    each format and qflux's own reader, on a transformer of width 48 and head dim 24."""
    from qflux.lora.adapter import read_lora
    from qflux.models.flux_kontext.tiny import build_flux_kontext

    odd = {"transformer": {"attention_head_dim": 24, "axes_dims_rope": (4, 10, 10)}}
    folder = build_flux_kontext(tmp_path / "odd", overrides=odd)
    tr = load_part(FLUX_KONTEXT, folder, "transformer", torch.float32)
    lora = _trained(tr, (*ALL, "norm_out.linear"))
    save_lora(tmp_path, tr, lora, dtype=torch.float32, pipeline_cls=FluxKontextPipeline)
    comfy = save_lora_comfyui(tmp_path, tr, lora, dtype=torch.float32, naming="flux")
    assert "diffusion_model.final_layer.adaLN_modulation.1.lora_up.weight" in load_file(comfy)
    save_file(comfyui_to_kohya(load_file(comfy)), str(tmp_path / "kohya.safetensors"))
    path = {"diffusers": tmp_path / "pytorch_lora_weights.safetensors", "comfyui": comfy,
            "kohya": tmp_path / "kohya.safetensors"}[kind]  # fmt: skip
    deltas = read_lora(tr, path, naming="flux", pipeline_cls=FluxKontextPipeline, what="--lora")
    scale = lora_scale(tr)
    modules = {k.split(".lora_A.")[0] for k in lora if ".lora_A." in k}
    assert set(deltas) == modules
    for m in modules:
        a, b = lora[f"{m}.lora_A.default.weight"], lora[f"{m}.lora_B.default.weight"]
        torch.testing.assert_close(deltas[m][1].double() @ deltas[m][0].double(), _delta(a, b, scale))


def test_bfl_modulation_halves_are_shift_then_scale(tiny_flux_dir: Path) -> None:
    """diffusers' norm_out.linear gives [scale; shift], BFL's final_layer.adaLN_modulation.1
    [shift; scale] (diffusers' own swap_scale_shift): the exported ΔW is the swapped one."""
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    lora = _trained(tr, ("norm_out.linear",))
    sd = lora_to_diffusers(tr, lora, torch.float32)
    comfy = to_comfyui(sd, scale=lora_scale(tr), out_features=module_out_features(tr), naming="flux")
    key = "diffusion_model.final_layer.adaLN_modulation.1"
    rank = comfy[f"{key}.lora_down.weight"].shape[0]
    fused = _delta(
        comfy[f"{key}.lora_down.weight"], comfy[f"{key}.lora_up.weight"], float(comfy[f"{key}.alpha"]) / rank
    )
    ours = _delta(sd["norm_out.linear.lora_A.weight"], sd["norm_out.linear.lora_B.weight"], lora_scale(tr))
    torch.testing.assert_close(swap_scale_shift(fused), ours)
