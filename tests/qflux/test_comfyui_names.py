"""Every file qflux writes, for every family and adapter kind, against the LoRA key names ComfyUI's own key map
accepts (read at its source, qflux/lora/comfyui_lora_keys.json): the ComfyUI file loads whole, every layer's
update as ComfyUI's weight adapters apply it equal to peft's; the diffusers-format file loses in ComfyUI exactly
the layers (and the α/r) the end block names. The adapters target every linear layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from diffusers.models import Flux2Transformer2DModel
from safetensors.torch import load_file

from qflux.config.schema import LoraConfig
from qflux.lora.adapter import (
    COMFYUI_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    call_with_lora,
    inject_lora,
    save_lora,
    save_lora_comfyui,
)
from qflux.lora.comfyui_keys import key_map, patched
from qflux.lora.formats import NAMINGS, comfy_target
from qflux.lora.kinds import comfy_drops, module_of
from qflux.models.flux2.tiny import build_flux2_klein
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
from qflux.train.summary import comfyui_note

FAMILIES = {"flux": FluxTransformer2DModel, "qwen": QwenImageTransformer2DModel, "flux2": Flux2Transformer2DModel}
KINDS = ["lora", "dora", "lokr", "loha"]
R, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def model_dirs(tiny_flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "flux": tiny_flux_dir,
        "qwen": build_qwen_image_edit(tmp_path_factory.mktemp("qwen"), seed=0),
        "flux2": build_flux2_klein(tmp_path_factory.mktemp("klein"), seed=0),
    }


def _adapted(model_dirs: dict[str, Path], family: str, kind: str):
    tr = FAMILIES[family].from_pretrained(model_dirs[family] / "transformer", torch_dtype=torch.float32)
    cfg = LoraConfig(kind=kind, r=R, lora_alpha=ALPHA, target_modules=("all-linear",))
    lora = inject_lora(tr, cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    return tr, {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in lora.items()}


def _reference(tr, lora, family: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """peft's ΔW of every adapted layer placed into ComfyUI's (fused) weights by qflux's name table, and
    the shape of each ComfyUI weight."""
    modules = list(dict.fromkeys(module_of(k) for k in lora))
    linear = {p.removesuffix(".base_layer"): m for p, m in tr.named_modules() if isinstance(m, torch.nn.Linear)}
    parts: dict[str, dict[int, str]] = {}
    for m in linear:
        if ".lora_" not in m:
            target, part, _ = comfy_target(m, family)
            parts.setdefault(target, {})[part] = m
    widths = {t: (sum(linear[m].out_features for m in p.values()), linear[p[0]].in_features) for t, p in parts.items()}
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        target, part, _ = comfy_target(m, family)
        layer = tr.get_submodule(m)
        own = {k.removeprefix(m + "."): v for k, v in lora.items() if module_of(k) == m}
        eye = torch.eye(layer.in_features)
        d = (call_with_lora(layer, own, {"x": eye}) - layer(eye)).T  # ΔW [out, in] (the bias cancels)
        if target in NAMINGS[family].swapped:  # ComfyUI's weight has BFL's [shift; scale], diffusers' [scale; shift]
            d = torch.cat(d.chunk(2, dim=0)[::-1])
        row = sum(linear[parts[target][p]].out_features for p in range(part))
        out.setdefault(target, torch.zeros(widths[target]))[row : row + d.shape[0]] += d
    return out, widths


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_file_against_comfyui_key_map(model_dirs, family: str, kind: str, tmp_path: Path) -> None:
    tr, lora = _adapted(model_dirs, family, kind)
    save_lora(tmp_path, tr, lora, dtype=torch.float32, pipeline_cls=None if kind in ("lokr", "loha") else _pipe(family))
    kmap = key_map(tr, family)
    modules = list(dict.fromkeys(module_of(k) for k in lora))
    diffusers_sd = load_file(tmp_path / LORA_WEIGHT_NAME)
    _, lost = patched(diffusers_sd, kmap, _reference(tr, lora, family)[1]) if kind != "dora" else (None, [])
    if kind == "dora":  # ComfyUI reads DoRA's tensors by other names and renders it otherwise: no ComfyUI file
        stems = {k.removesuffix(".lora_A.weight") for k in diffusers_sd if k.endswith(".lora_A.weight")}
        lost = sorted(stems - set(kmap))
    drops = comfy_drops(modules, family)  # type: ignore[arg-type]
    assert sorted(lost) == sorted(f"transformer.{m}" for m in drops)
    note = comfyui_note(kind, ALPHA / R, drops)
    if kind in ("lokr", "loha") and not drops:  # LyCORIS files carry .alpha: nothing lost
        assert note is None
    else:  # a LoRA's α/r = 2 (ComfyUI reads no peft metadata), DoRA's rendering, or modules
        assert note is not None and "load the _comfyui file" in note
        assert (f"lose {len(drops)} adapted layer(s)" in note) == bool(drops)
        assert ("strength 1, not α/r = 2" in note) == (kind in ("lora", "dora"))
    if family == "flux2":
        assert drops, "FLUX.2's time embedder and shared modulations have no ComfyUI diffusers name"
    if kind == "dora":
        return
    ref, widths = _reference(tr, lora, family)
    save_lora_comfyui(tmp_path, tr, lora, dtype=torch.float32, naming=family)  # type: ignore[arg-type]
    got, lost = patched(load_file(tmp_path / COMFYUI_WEIGHT_NAME), kmap, widths)
    assert lost == []  # every key loads in ComfyUI
    assert got.keys() == ref.keys()
    for name, d in ref.items():
        torch.testing.assert_close(got[name], d, rtol=1e-4, atol=1e-5, msg=name)


def _pipe(family: str):
    from diffusers import Flux2KleinPipeline, FluxKontextPipeline, QwenImageEditPipeline

    return {"flux": FluxKontextPipeline, "qwen": QwenImageEditPipeline, "flux2": Flux2KleinPipeline}[family]
