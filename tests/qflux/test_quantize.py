"""model.quantize: fp8 and 4-bit storage of the frozen base, its maths, pre-quantized checkpoints,
and the error when an extra is missing."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qflux.config.errors import QfluxError
from qflux.models.flux_kontext.loaders import FLUX_KONTEXT
from qflux.models.flux_kontext.loss import velocity
from qflux.models.flux_kontext.tiny import build_flux_kontext
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
from qflux.weights.loading import load_part
from qflux.weights.quantize import (
    KEEP,
    Float8StorageLinear,
    count_layers,
    fits_4bit,
    is_quantized,
    linear_4bit,
    prequantized_kind,
    quantize_frozen,
    weight_bytes,
)

# Forward tolerance against bf16 on the width-64 transformer: max |Δv| / max |v| (measured by
# benchmarks/precision.py: fp8 0.03, nf4 / fp4 about 0.1; the bound leaves room across seeds)
TOLERANCE = {"fp8": 0.08, "nf4": 0.25, "fp4": 0.3}
# Weight bytes against bf16 on the width-64 model (measured: fp8 0.55, 4-bit 0.33: the embedders
# of 16 and 32 inputs and the kept proj_out stay bf16)
BYTES = {"fp8": 0.6, "nf4": 0.4, "fp4": 0.4}
# Widths the tests build: the tiny preset (32: few layers fit 4 bits), one where the 4-bit kernels
# take the transformer's blocks (64), and a held-out shape (width 48, head dim 24: none fit)
WIDE = {"transformer": {"attention_head_dim": 32, "axes_dims_rope": (8, 12, 12)}}
ODD = {"transformer": {"attention_head_dim": 24, "axes_dims_rope": (4, 10, 10)}}


@pytest.fixture(scope="module")
def wide_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_flux_kontext(tmp_path_factory.mktemp("wide"), seed=0, overrides=WIDE)


@pytest.fixture(scope="module")
def odd_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_flux_kontext(tmp_path_factory.mktemp("odd"), seed=0, overrides=ODD)


def _velocity(tr: nn.Module) -> torch.Tensor:
    """One no-grad forward in eval mode: the path bitsandbytes repacks for on AVX-512 BF16 CPUs."""
    g = torch.Generator().manual_seed(0)
    c = tr.config.in_channels // 4
    x, ctl = torch.randn(1, c, 8, 8, generator=g), torch.randn(1, c, 8, 8, generator=g)
    pooled = torch.randn(1, tr.config.pooled_projection_dim, generator=g)
    tokens = torch.randn(1, 8, tr.config.joint_attention_dim, generator=g)
    with torch.no_grad():
        return velocity(
            tr, {}, x, ctl, torch.tensor([0.6]), pooled, tokens, torch.tensor([2.5]), dtype=torch.bfloat16
        ).float()


@pytest.mark.parametrize("mode", ["fp8", "nf4", "fp4"])
def test_quantized_forward_is_close_to_bf16_and_smaller(wide_flux_dir: Path, mode: str) -> None:
    ref = load_part(FLUX_KONTEXT, wide_flux_dir, "transformer", torch.bfloat16)
    quant = load_part(FLUX_KONTEXT, wide_flux_dir, "transformer", torch.bfloat16, quantize=mode)
    v_ref, v = _velocity(ref), _velocity(quant)
    rel = float((v - v_ref).abs().max() / v_ref.abs().max())
    assert 0 < rel < TOLERANCE[mode], rel
    assert weight_bytes(quant) < BYTES[mode] * weight_bytes(ref)
    assert isinstance(quant.proj_out, nn.Linear) and quant.proj_out.weight.dtype == torch.bfloat16  # kept
    assert is_quantized(quant.transformer_blocks[0].attn.to_q)


def _assert_packs_for_cpu(module: nn.Module) -> int:
    """Every 4-bit layer of ``module`` takes bitsandbytes' AVX-512 BF16 repacking (its shape checks run
    on any CPU; the packed matmul itself needs the instruction set). Returns how many were checked."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layers = [m for m in module.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    for m in layers:
        _convert_weight_packed_for_cpu(m.weight.data.clone(), copy.deepcopy(m.weight.quant_state))
    return len(layers)


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_4bit_layers_fit_every_cpu_and_the_rest_are_counted(
    tiny_flux_dir: Path, wide_flux_dir: Path, odd_flux_dir: Path, tmp_path: Path, mode: str
) -> None:
    """Layers bitsandbytes could not repack on an AVX-512 BF16 CPU stay bf16 and are counted, at any
    width; the forward runs (on those CPUs through the packed kernel)."""
    qwen = build_qwen_image_edit(tmp_path / "qwen", seed=0)
    from qflux.models.qwen_image_edit.loaders import QWEN_IMAGE_EDIT
    from qflux.weights.loading import load_part

    checked = {}
    for name, module in {
        "tiny": load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.bfloat16, quantize=mode),
        "wide": load_part(FLUX_KONTEXT, wide_flux_dir, "transformer", torch.bfloat16, quantize=mode),
        "odd": load_part(FLUX_KONTEXT, odd_flux_dir, "transformer", torch.bfloat16, quantize=mode),
        "qwen_text": load_part(QWEN_IMAGE_EDIT, qwen, "text_encoder", torch.bfloat16, quantize=mode),
    }.items():
        count = count_layers(module, mode)
        assert _assert_packs_for_cpu(module) == count.quantized
        left = [m for n, m in module.named_modules() if type(m) is nn.Linear and not KEEP.search(n)]
        assert len(left) == count.kept and not any(fits_4bit(m.out_features, m.in_features) for m in left)
        checked[name] = count
        if name != "qwen_text":
            assert torch.isfinite(_velocity(module)).all()
    assert checked["wide"].quantized > checked["tiny"].quantized > 0 and checked["tiny"].kept > 0
    assert checked["odd"].quantized == 0 and checked["odd"].kept > 0  # width 48: nothing fits, all counted
    assert checked["qwen_text"].kept > 0  # width 16: the vision merger alone fits


def test_training_after_a_no_grad_pass_keeps_4bit_gradients(wide_flux_dir: Path) -> None:
    """A validation pass (eval mode, no grad) before a training step: on AVX-512 BF16 CPUs
    bitsandbytes would repack the weights into a layout without backward; training keeps them out."""
    from qflux.config.schema import LoraConfig
    from qflux.lora.adapter import inject_lora
    from qflux.weights.frozen_linear import prepare_frozen_base

    tr = load_part(FLUX_KONTEXT, wide_flux_dir, "transformer", torch.bfloat16, quantize="nf4")
    lora = inject_lora(tr, LoraConfig(r=4, init_lora_weights=False), seed=0)
    assert prepare_frozen_base(tr, fp8_matmul=False, device=torch.device("cpu"))["4bit_trainable"] > 0
    _velocity(tr)  # no grad, the module in eval mode
    layers = [m for m in tr.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    assert layers and all(m.training for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    leaves = {k: v.requires_grad_(True) for k, v in lora.items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tr.config.in_channels // 4, 8, 8, generator=g)
    pooled = torch.randn(1, tr.config.pooled_projection_dim, generator=g)
    tokens = torch.randn(1, 8, tr.config.joint_attention_dim, generator=g)
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(tr, leaves, strict=False):
        v = velocity(tr, leaves, x, x, torch.tensor([0.6]), pooled, tokens, torch.tensor([2.5]),
                             dtype=torch.bfloat16)  # fmt: skip
        grads = torch.autograd.grad(v.float().square().mean(), list(leaves.values()))
    assert all(torch.isfinite(gr).all() for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)


def test_fp8_storage_maths() -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        lin.weight[3] *= 1e-3  # a row far below e4m3's normal range keeps its bits through its scale
    q = Float8StorageLinear.from_linear(lin)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (48, 1)
    deq = q.weight.float() * q.weight_scale
    assert torch.allclose(deq, lin.weight.float(), rtol=2**-3, atol=0)  # e4m3: 3 mantissa bits per row scale
    x = torch.randn(5, 64, generator=g, dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, nn.functional.linear(x, deq.to(torch.bfloat16), lin.bias))
    y.float().square().sum().backward()
    grad = x.grad
    x.grad = None
    nn.functional.linear(x, deq.to(torch.bfloat16), lin.bias).float().square().sum().backward()
    torch.testing.assert_close(grad, x.grad)
    # torch.func (the default engine) differentiates through it as well
    fgrad = torch.func.grad(lambda t: q(t).float().square().sum())(x.detach())
    torch.testing.assert_close(fgrad, grad)


@pytest.mark.parametrize("mode", ["fp8", "nf4"])
def test_prequantized_checkpoint_loads_as_stored(wide_flux_dir: Path, tmp_path: Path, mode: str) -> None:
    """A folder whose transformer is saved quantized (bitsandbytes' 4-bit state dict with
    quantization_config, or fp8 weights with scales) loads to the same layers and output."""
    quant = load_part(FLUX_KONTEXT, wide_flux_dir, "transformer", torch.bfloat16, quantize=mode)
    folder = tmp_path / "model"
    shutil.copytree(wide_flux_dir, folder)
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    if mode != "fp8":
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                         "bnb_4bit_quant_type": mode}  # fmt: skip
    config_file.write_text(json.dumps(config))
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    save_file({k: v.clone() for k, v in quant.state_dict().items()},  # shared code tables: one copy each
              str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    assert prequantized_kind(folder / "transformer") == mode
    assert prequantized_kind(wide_flux_dir / "transformer") is None
    loaded = load_part(FLUX_KONTEXT, folder, "transformer", torch.bfloat16)
    assert weight_bytes(loaded) == weight_bytes(quant)
    torch.testing.assert_close(_velocity(loaded), _velocity(quant), rtol=0, atol=0)


def test_prequantized_4bit_layers_of_any_shape_load(tiny_flux_dir: Path, tmp_path: Path) -> None:
    """A checkpoint quantized by another tool, every linear in 4 bits whatever its shape: the layers
    bitsandbytes cannot repack on every CPU come back dequantized, the others stay 4-bit."""
    everything = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.bfloat16)
    for name, m in [(n, m) for n, m in everything.named_modules() if type(m) is nn.Linear and not KEEP.search(n)]:
        parent, _, child = name.rpartition(".")
        holder = everything.get_submodule(parent) if parent else everything
        setattr(holder, child, linear_4bit(m, "nf4", torch.bfloat16))
    folder = tmp_path / "model"
    shutil.copytree(tiny_flux_dir, folder)
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    config_file.write_text(json.dumps(config))
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    save_file({k: v.clone() for k, v in everything.state_dict().items()},
              str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    loaded = load_part(FLUX_KONTEXT, folder, "transformer", torch.bfloat16)
    count = count_layers(loaded, "nf4")
    assert count.quantized == _assert_packs_for_cpu(loaded) > 0 and count.kept > 0
    everything.train()  # never repacked: the reference runs the generic 4-bit path on any CPU
    v_ref, v = _velocity(everything), _velocity(loaded)
    assert float((v - v_ref).abs().max() / v_ref.abs().max()) < 0.05


def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(QfluxError, match=r"pip install 'qflux\[4bit\]'"):
        quantize_frozen(nn.Sequential(nn.Linear(4, 4).requires_grad_(False)), "nf4")
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    monkeypatch.setitem(sys.modules, "torchao.float8.float8_utils", None)
    with pytest.raises(QfluxError, match=r"pip install 'qflux\[fp8\]'"):
        quantize_frozen(nn.Sequential(nn.Linear(4, 4).requires_grad_(False)), "fp8")
