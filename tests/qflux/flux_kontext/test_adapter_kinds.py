"""DoRA, LoKr and LoHa on the tiny FLUX.1 Kontext: the files qflux writes give our predict's image when
read back (qflux's ``--lora`` and, for DoRA, diffusers' ``load_lora_weights``), ``pretrained_weight``
reads them to the same tensors, DoRA's forward is the formula, and the LyCORIS files use the key
names and scales of ComfyUI's weight adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from qflux.config.errors import QfluxError
from qflux.config.schema import LoraConfig
from qflux.lora.adapter import (
    COMFYUI_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    call_with_lora,
    inject_lora,
    load_lora_file,
    lora_from_file,
    save_lora,
    save_lora_comfyui,
)
from qflux.lora.kinds import adapter_kind, lycoris_stem, module_of
from qflux.models.flux_kontext.loaders import FLUX_KONTEXT, load_flux_kontext
from qflux.models.flux_kontext.predict import predict
from qflux.weights.loading import load_part
from qflux.weights.quantize import quantize_frozen

STEPS = 3
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "ff.net.2", "proj_mlp", "proj_out", "norm1.linear")
# (kind, rank): the tiny model's 32-wide layers factor as 4 ⊗ 8, so LoKr at rank 4 holds two full
# factors (its scale folded into lokr_w1) and at rank 2 a low-rank W2 = W2a·W2b (with .alpha)
CASES = [("dora", 4), ("lokr", 4), ("lokr", 2), ("loha", 4)]
LYCORIS_CASES = [c for c in CASES if c[0] != "dora"]
# the tensor names ComfyUI's loaders read (comfy/lora.py load_lora, comfy/weight_adapter/lokr.py, loha.py)
COMFY_NAMES = {
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
}


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _trained(transformer, kind: str, r: int) -> dict[str, torch.Tensor]:
    lora = inject_lora(transformer, LoraConfig(kind=kind, r=r, lora_alpha=2 * r, target_modules=TARGETS), seed=0)
    g = torch.Generator().manual_seed(1)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in lora.items()}


def _predict(models, lora=None) -> np.ndarray:
    kw = {"num_inference_steps": STEPS, "max_sequence_length": 64, "guidance_scale": 2.5}
    return predict(models, _image(), "invert the colors", lora=lora, **kw)


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-r{r}" for k, r in CASES])
def saved(request, tiny_flux_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    kind, r = request.param
    out = tmp_path_factory.mktemp(f"{kind}{r}")
    models = load_flux_kontext(tiny_flux_dir, torch.float32)
    lora = _trained(models.transformer, kind, r)
    save_lora(out, models.transformer, lora, dtype=torch.float32, pipeline_cls=FluxKontextPipeline)
    if kind != "dora":
        save_lora_comfyui(out, models.transformer, lora, dtype=torch.float32, naming="flux")
    return kind, r, out, models, lora, _predict(models, lora), _predict(models)


def test_predict_reads_every_file_back_to_the_same_image(tiny_flux_dir: Path, saved) -> None:
    kind, _, out, _, _, ours, base = saved
    assert _mad(ours, base) > 5 / 255  # the adapter really changes the image
    files = [LORA_WEIGHT_NAME] + ([COMFYUI_WEIGHT_NAME] if kind != "dora" else [])
    for name in files:
        models = load_flux_kontext(tiny_flux_dir, torch.float32)
        load_lora_file(models.transformer, out / name, naming="flux", pipeline_cls=FluxKontextPipeline)
        assert adapter_kind(models.transformer) == kind
        assert _mad(_predict(models), ours) <= 1 / 255, name


@pytest.mark.parametrize("saved", [("dora", 4)], indirect=True, ids=["dora-r4"])
def test_dora_loads_in_diffusers_and_moves_the_image(tiny_flux_dir: Path, saved) -> None:
    _, _, out, _, _, ours, base = saved
    pipe = FluxKontextPipeline.from_pretrained(tiny_flux_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    kw = {"height": 48, "width": 64, "max_area": 48 * 64, "_auto_resize": False, "guidance_scale": 2.5}
    image = pipe(image=_image(), prompt="invert the colors", num_inference_steps=STEPS, max_sequence_length=64,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kw).images[0]  # fmt: skip
    assert _mad(image, ours) <= 1 / 255
    assert _mad(image, base) > 5 / 255


def test_pretrained_weight_reads_every_file_to_the_same_tensors(tiny_flux_dir: Path, saved) -> None:
    kind, r, out, _, lora, _, _ = saved
    for name in [LORA_WEIGHT_NAME] + ([COMFYUI_WEIGHT_NAME] if kind != "dora" else []):
        tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
        init = inject_lora(tr, LoraConfig(kind=kind, r=r, lora_alpha=2 * r, target_modules=TARGETS), seed=5)
        got = lora_from_file(tr, out / name, init, naming="flux", pipeline_cls=FluxKontextPipeline)
        assert got.keys() == lora.keys()
        for k in lora:
            torch.testing.assert_close(got[k], lora[k], rtol=1e-6, atol=1e-6)


def test_pretrained_weight_of_another_kind_or_rank_is_refused(tiny_flux_dir: Path, saved) -> None:
    kind, r, out, _, _, _, _ = saved
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    other = "loha" if kind != "loha" else "lokr"
    init = inject_lora(tr, LoraConfig(kind=other, r=r, target_modules=TARGETS), seed=0)
    with pytest.raises(QfluxError, match=f"is a {kind} file; set model.lora.kind: {kind}"):
        lora_from_file(tr, out / LORA_WEIGHT_NAME, init, naming="flux", pipeline_cls=FluxKontextPipeline)
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    init = inject_lora(tr, LoraConfig(kind=kind, r=r + 1, target_modules=TARGETS), seed=0)
    with pytest.raises(QfluxError, match=r"set model\.lora\.r and model\.lora\.lora_alpha"):
        lora_from_file(tr, out / LORA_WEIGHT_NAME, init, naming="flux", pipeline_cls=FluxKontextPipeline)


def _comfy_delta(parts: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """ΔW as ComfyUI's weight adapters compute it (comfy/weight_adapter/lokr.py and loha.py,
    ``calculate_weight``, strength 1): alpha / rank with the rank of a low-rank factor, else 1."""
    alpha = parts.get("alpha")
    if kind == "loha":
        dim = parts["hada_w1_b"].shape[0]
        scale = float(alpha) / dim if alpha is not None else 1.0
        m1 = parts["hada_w1_a"] @ parts["hada_w1_b"]
        return scale * m1 * (parts["hada_w2_a"] @ parts["hada_w2_b"])
    dim = None
    w1 = parts.get("lokr_w1")
    if w1 is None:
        dim = parts["lokr_w1_b"].shape[0]
        w1 = parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts.get("lokr_w2")
    if w2 is None:
        dim = parts["lokr_w2_b"].shape[0]
        w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2)


@pytest.mark.parametrize("saved", LYCORIS_CASES, indirect=True, ids=[f"{k}-r{r}" for k, r in LYCORIS_CASES])
def test_lycoris_files_use_comfyui_names_and_scales(saved) -> None:
    kind, r, out, models, lora, _, _ = saved
    tr = models.transformer
    adapted = sorted({module_of(k) for k in lora})
    # the diffusers-named file: transformer.<path>; the ComfyUI file: diffusion_model.<BFL layer>, or lycoris_<path_>
    # for a part of a fused layer (tests/qflux/test_comfyui_names.py checks these against ComfyUI's key map)
    spellings = {LORA_WEIGHT_NAME: {f"transformer.{m}": m for m in adapted}, COMFYUI_WEIGHT_NAME: {
        lycoris_stem(m, "flux"): m for m in adapted}}  # fmt: skip
    assert any(s.startswith("lycoris_") for s in spellings[COMFYUI_WEIGHT_NAME])
    assert any(s.startswith("diffusion_model.") for s in spellings[COMFYUI_WEIGHT_NAME])
    for name, names in spellings.items():
        sd = load_file(out / name)
        with safe_open(str(out / name), "pt") as f:
            assert "qflux_adapter" in f.metadata()
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in sd.items():
            stem, _, leaf = key.rpartition(".")
            assert stem in names and leaf in COMFY_NAMES[kind], key
            modules.setdefault(names[stem], {})[leaf] = t
        assert ("alpha" in next(iter(modules.values()))) == (kind == "loha" or r == 2)
        for module, parts in modules.items():
            layer = tr.get_submodule(module)
            own = {_strip(k, module): v for k, v in lora.items() if k.startswith(module + ".")}
            eye = torch.eye(layer.in_features)
            peft_delta = call_with_lora(layer, own, {"x": eye}) - layer(eye)  # ΔWᵀ (the bias cancels)
            torch.testing.assert_close(_comfy_delta(parts, kind), peft_delta.T, rtol=1e-4, atol=1e-5)


def _strip(name: str, module: str) -> str:
    return name.removeprefix(module + ".")


@pytest.mark.parametrize("quantize", ["none", "fp8"])
def test_dora_forward_is_the_formula(tiny_flux_dir: Path, quantize: str) -> None:
    """y = m ⊙ (W + s·B·A)x / ‖W + s·B·A‖_row + b for a DoRA layer called through our functional path,
    W the weight the base layer multiplies by (fp8: the dequantized s_w ⊙ W₈, not the codes)."""
    dtype = torch.float32 if quantize == "none" else torch.bfloat16
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", dtype)
    quantize_frozen(tr, quantize)
    lora = _trained(tr, "dora", 4)
    module = "transformer_blocks.0.attn.to_q"
    layer = tr.get_submodule(module)
    mine = {_strip(k, module): v for k, v in lora.items() if k.startswith(module + ".")}
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2), dtype=dtype)
    got = call_with_lora(layer, mine, {"x": x})
    a, b = mine["lora_A.default.weight"], mine["lora_B.default.weight"]
    m = mine["lora_magnitude_vector.default.weight"]
    base = layer.base_layer
    w = (base.dequantize() if quantize == "fp8" else base.weight).float() + (8 / 4) * b @ a
    want = (x.float() @ w.T) * (m / w.norm(dim=1)) + base.bias.float()
    tol = 1e-5 if quantize == "none" else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6 if quantize == "none" else 1e-2)  # alone: the base


@pytest.mark.compile
@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_kinds_compile_as_one_graph(tiny_flux_dir: Path, kind: str) -> None:
    """An adapted layer through our functional path under ``torch.compile(fullgraph=True)`` (no
    host-side branch: peft's LoKr / LoHa layers stay out of their module-dropout draw) equals eager.
    (peft's DoRA layer does not trace: train.compile refuses it, and auto runs it eagerly.)"""
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    lora = _trained(tr, kind, 4)
    module = "transformer_blocks.0.attn.to_q"
    layer = tr.get_submodule(module)
    mine = {_strip(k, module): v for k, v in lora.items() if k.startswith(module + ".")}
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(lambda t: call_with_lora(layer, mine, {"x": t}), fullgraph=True)
    torch.testing.assert_close(compiled(x), call_with_lora(layer, mine, {"x": x}), rtol=1e-5, atol=1e-5)
