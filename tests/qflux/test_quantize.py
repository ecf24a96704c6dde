"""model.quantize: fp8 and 4-bit storage of the frozen base, its maths, pre-quantized checkpoints,
and the error when an extra is missing."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qflux.errors import QfluxError
from qflux.flux_kontext.loaders import load_flux_kontext_transformer
from qflux.flux_kontext.step import predict_velocity
from qflux.quantize import Float8StorageLinear, prequantized_kind, quantize_frozen, weight_bytes

# Forward tolerance against bf16 on the tiny transformer: max |Δv| / max |v| (measured by
# benchmarks/precision.py: fp8 0.03, nf4 / fp4 about 0.1; the bound leaves room across seeds)
TOLERANCE = {"fp8": 0.08, "nf4": 0.25, "fp4": 0.3}
# Weight bytes against bf16 on the tiny model (measured: fp8 0.556, 4-bit 0.285; fp8's per-row
# float32 scales weigh 1/8 at the tiny width of 32)
BYTES = {"fp8": 0.6, "nf4": 1 / 3, "fp4": 1 / 3}


def _velocity(tr: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    pooled, tokens = torch.randn(1, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return predict_velocity(
            tr, {}, x, c, torch.tensor([0.6]), pooled, tokens, torch.tensor([2.5]), dtype=torch.bfloat16
        ).float()


@pytest.mark.parametrize("mode", ["fp8", "nf4", "fp4"])
def test_quantized_forward_is_close_to_bf16_and_smaller(tiny_flux_dir: Path, mode: str) -> None:
    ref = load_flux_kontext_transformer(tiny_flux_dir, torch.bfloat16)
    quant = load_flux_kontext_transformer(tiny_flux_dir, torch.bfloat16, quantize=mode)
    v_ref, v = _velocity(ref), _velocity(quant)
    rel = float((v - v_ref).abs().max() / v_ref.abs().max())
    assert 0 < rel < TOLERANCE[mode], rel
    assert weight_bytes(quant) < BYTES[mode] * weight_bytes(ref)
    assert isinstance(quant.proj_out, nn.Linear) and quant.proj_out.weight.dtype == torch.bfloat16  # kept


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
def test_prequantized_checkpoint_loads_as_stored(tiny_flux_dir: Path, tmp_path: Path, mode: str) -> None:
    """A folder whose transformer is saved quantized (bitsandbytes' 4-bit state dict with
    quantization_config, or fp8 weights with scales) loads to the same layers and output."""
    quant = load_flux_kontext_transformer(tiny_flux_dir, torch.bfloat16, quantize=mode)
    folder = tmp_path / "model"
    shutil.copytree(tiny_flux_dir, folder)
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
    assert prequantized_kind(tiny_flux_dir / "transformer") is None
    loaded = load_flux_kontext_transformer(folder, torch.bfloat16)
    assert weight_bytes(loaded) == weight_bytes(quant)
    torch.testing.assert_close(_velocity(loaded), _velocity(quant), rtol=0, atol=0)


def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(QfluxError, match=r"pip install 'qflux\[4bit\]'"):
        quantize_frozen(nn.Sequential(nn.Linear(4, 4).requires_grad_(False)), "nf4")
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    monkeypatch.setitem(sys.modules, "torchao.float8.float8_utils", None)
    with pytest.raises(QfluxError, match=r"pip install 'qflux\[fp8\]'"):
        quantize_frozen(nn.Sequential(nn.Linear(4, 4).requires_grad_(False)), "fp8")
