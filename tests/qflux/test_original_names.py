"""Weights in their original (BFL) names: FLUX.2 [klein]'s read back through diffusers' own converter
(``from_single_file``) bit for bit, and trained on as ``model.transformer_file``; FLUX.1's located through ComfyUI's
own diffusers-to-BFL table (read at its source), since diffusers' FLUX.1 converter assumes the full model's width
(``benchmarks/bfl_names.py`` runs it at that width); Qwen-Image's are diffusers' own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models import Flux2Transformer2DModel
from safetensors.torch import load_file, save_file

import qflux.models  # noqa: F401  (registers every family's names)
from qflux.lora.comfyui_keys import _flux_to_diffusers
from qflux.lora.original_names import to_original_names
from qflux.models.flux2.tiny import build_flux2_klein


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next((folder / "transformer").glob("*.safetensors")))


@pytest.fixture(scope="module")
def klein(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_flux2_klein(tmp_path_factory.mktemp("klein"), seed=0)


def test_klein_in_bfl_names_reads_back_through_diffusers_converter(klein: Path, tmp_path: Path) -> None:
    weights = _weights(klein)
    bfl = to_original_names(weights, "flux2")
    assert any(k.startswith("double_blocks.0.img_attn.qkv") for k in bfl) and not any(
        "transformer_blocks" in k for k in bfl
    )
    save_file(bfl, str(tmp_path / "flux2-klein-tiny.safetensors"))
    model = Flux2Transformer2DModel.from_single_file(str(tmp_path / "flux2-klein-tiny.safetensors"), config=str(klein),
                                                     subfolder="transformer", torch_dtype=torch.float32)  # fmt: skip
    back = model.state_dict()
    assert back.keys() == weights.keys() and all(torch.equal(back[k].to(v.dtype), v) for k, v in weights.items())


def test_flux1_in_bfl_names_is_where_comfyuis_table_looks(tiny_flux_dir: Path) -> None:
    """Every diffusers linear weight is at the rows of the BFL weight that ComfyUI's ``flux_to_diffusers`` names (its
    row offsets in units of the hidden width, the final modulation's halves swapped)."""
    weights = _weights(tiny_flux_dir)
    bfl = to_original_names(weights, "flux")
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir / "transformer")
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    checked = 0
    for module, patch in _flux_to_diffusers(transformer, hidden).items():
        if f"{module}.weight" not in weights:
            continue
        w = bfl[f"{patch.module}.weight"]
        if patch.rows is not None:
            w = w[patch.rows[0] : patch.rows[0] + patch.rows[1]]
        if patch.swap:
            w = torch.cat(w.chunk(2)[::-1])
        assert torch.equal(w, weights[f"{module}.weight"]), module
        checked += 1
    assert checked == sum(1 for k in weights if k.endswith(".weight") and weights[k].ndim == 2)
    assert bfl["double_blocks.0.img_attn.norm.query_norm.scale"] is weights["transformer_blocks.0.attn.norm_q.weight"]


def test_klein_trains_on_its_bfl_file_as_on_the_folder(klein: Path, tmp_path: Path) -> None:
    from qflux.config.parse import load_config
    from qflux.models.flux2.config import Flux2KleinConfig
    from recipes.flux2_klein_lora import train

    save_file(to_original_names(_weights(klein), "flux2"), str(tmp_path / "bfl.safetensors"))

    def run(out: str, **more: object):  # type: ignore[no-untyped-def]
        return train(load_config(Flux2KleinConfig, None, {
            "model.pretrained_model_name_or_path": str(klein), "model.dtype": "float32", "train.max_train_steps": 2,
            "logging.output_dir": str(tmp_path / out), "logging.write_sample": False, "logging.report_to": "none",
            **more}))  # fmt: skip

    folder, filed = run("folder"), run("file", **{"model.transformer_file": str(tmp_path / "bfl.safetensors")})
    assert folder.losses == filed.losses
    assert all(torch.equal(folder.state.lora[k], filed.state.lora[k]) for k in folder.state.lora)


def test_an_fp8_scaled_bfl_file_stays_fp8_through_diffusers_converter(klein: Path, tmp_path: Path) -> None:
    """ComfyUI's usual file: BFL names, fp8-scaled. The converter moves its fp8 rows as they are, each converted
    weight keeps the scale of the fused weight its rows came from: the model's dequantized weights are the file's."""
    from qflux.lora.model_verbs import fp8_scaled
    from qflux.models.flux2.loaders import KLEIN
    from qflux.weights.quantize import Float8StorageLinear

    bfl = fp8_scaled(to_original_names(_weights(klein), "flux2"))
    save_file(bfl, str(tmp_path / "flux2-klein-tiny_fp8_scaled.safetensors"))
    models = KLEIN.files.load(klein, torch.float32, include=("transformer",),
                              files={"transformer": tmp_path / "flux2-klein-tiny_fp8_scaled.safetensors"})  # fmt: skip
    stored = {n: m for n, m in models.transformer.named_modules() if isinstance(m, Float8StorageLinear)}
    assert stored and not any(type(m) is torch.nn.Linear for m in models.transformer.modules())  # none upcast
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    dequantized = {}
    for k, v in bfl.items():
        if not k.endswith(("scale_weight", "scaled_fp8")):
            fp8 = v.dtype == torch.float8_e4m3fn
            dequantized[k] = v.float() * bfl[k.removesuffix(".weight") + ".scale_weight"] if fp8 else v.float()

    want = convert_flux2_transformer_checkpoint_to_diffusers(dequantized)
    for name, m in stored.items():
        assert torch.equal(m.weight.float() * m.weight_scale, want[f"{name}.weight"]), name
