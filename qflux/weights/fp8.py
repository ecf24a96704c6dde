"""fp8 matmuls for the frozen base (``train.fp8_matmul``): static weight scales, dynamic activations.

Each large frozen ``nn.Linear`` becomes a :class:`Float8FrozenLinear` holding its weight once in
float8_e4m3fn with one scale per output channel, computed at conversion (the weight is frozen, so
the scales never change). Every call scales the activations per row (per token) from their
current amax and runs ``torch._scaled_mm``, which accumulates in fp32 and applies both scales:

    s_w[o] = amax_i |W[o, i]| / 448          W₈ = sat(W / s_w)           (once)
    s_x[m] = amax_i |x[m, i]| / 448          x₈ = sat(x / s_x)           (every call)
    y[m, o] = s_x[m] · s_w[o] · Σ_i x₈[m, i] · W₈[o, i]  + b[o]

The input gradient uses the dequantized weight in the activation dtype (∂x = ∂y · (s_w ⊙ W₈)), so
the LoRA's gradients keep their precision; the LoRA itself is untouched (fp32). Scale computation
and saturating casts come from torchao's float8 module (an optional extra).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qflux.config.errors import QfluxError, optional
from qflux.weights.shell import linear_shell

FP8 = torch.float8_e4m3fn


def _torchao_float8() -> Any:
    return optional(
        "torchao.float8.float8_utils",
        extra="fp8",
        needed_by="fp8 (train.fp8_matmul, model.quantize: fp8)",
        otherwise="set train.fp8_matmul: false and model.quantize to another value",
    )


def quantize_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each row of a 2-D tensor into float8_e4m3fn.

    Args:
        t: [R, C] in any float dtype.

    Returns:
        (t₈ [R, C] float8_e4m3fn, s [R, 1] float32) with t ≈ s · t₈ (s is the dequantization scale,
        amax/448; torchao's scale is its reciprocal).
    """
    u = _torchao_float8()  # the install hint when torchao is missing
    inv = u.tensor_to_scale(t, FP8, scaling_granularity=u.ScalingGranularity.AXISWISE, axiswise_dim=-1)  # 448/amax
    return u.to_fp8_saturated(t.float() * inv, FP8), inv.reciprocal()


def dequantize(t8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s · t₈ in ``dtype``: [R, C]."""
    return (t8.float() * scale).to(dtype)


class _Fp8LinearFn(torch.autograd.Function):
    """y = x·Wᵀ + b with fp8 operands (see the module docstring); gradient for x only."""

    @staticmethod
    def forward(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        x8, x_scale = quantize_rowwise(x2)
        y = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=x.dtype, use_fast_accum=False)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.view(*x.shape[:-1], w8.shape[0])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        w8, w_scale = ctx.saved_tensors
        # ∂x = ∂y · (s_w ⊙ W₈)   [.., in]
        return grad @ dequantize(w8, w_scale, grad.dtype), None, None, None


class SelfDequantizing:
    """peft's hook for a float8 layer: its DoRA reads a base layer's weight through
    ``dequantize_module_weight``, which asks a layer with ``W_q`` to ``dequantize()`` itself, so
    ‖W + ΔW‖ is taken of the weight the layer multiplies by, not of the raw float8 codes."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    compute_dtype: torch.dtype = torch.bfloat16
    """The dtype the layer computes in."""

    @property
    def W_q(self) -> torch.Tensor:
        """The stored float8 weight [out, in]."""
        return self.weight

    def dequantize(self) -> torch.Tensor:
        """s_w ⊙ W₈ in the layer's compute dtype [out, in]."""
        return dequantize(self.weight, self.weight_scale, self.compute_dtype)


class Float8FrozenLinear(SelfDequantizing, nn.Linear):
    """A frozen linear layer whose weight is stored as float8_e4m3fn with per-output-channel scales.

    ``weight`` is the fp8 tensor [out, in] (half the bytes of bf16); ``weight_scale`` [out, 1] float32.
    """

    weight_scale: torch.Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8FrozenLinear:
        """Quantize ``linear``'s weight (static scales); bias and device are kept."""
        new = linear_shell(cls, linear.in_features, linear.out_features)
        w8, scale = quantize_rowwise(linear.weight.detach())
        new.weight = nn.Parameter(w8, requires_grad=False)
        new.register_buffer("weight_scale", scale)
        new.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFn.apply(x, self.weight, self.weight_scale, self.bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the matmul sees it: s_w ⊙ W₈ [out, in]."""
        return dequantize(self.weight, self.weight_scale, dtype)


def _eligible(m: nn.Module, min_features: int) -> bool:
    if not isinstance(m, nn.Linear) or isinstance(m, Float8FrozenLinear) or m.weight.requires_grad:
        return False
    n_in, n_out = m.in_features, m.out_features
    # _scaled_mm needs both dimensions divisible by 16
    return n_in % 16 == 0 and n_out % 16 == 0 and min(n_in, n_out) >= min_features


def use_fp8_matmul(module: nn.Module, *, min_features: int = 512) -> int:
    """Replace every frozen ``nn.Linear`` in ``module`` with both dimensions ≥ ``min_features``
    (and divisible by 16) by a :class:`Float8FrozenLinear`, in place. Layers holding trainable
    weights (the LoRA's) are left alone.

    Returns:
        How many layers were converted.
    """
    targets = [(name, m) for name, m in module.named_modules() if _eligible(m, min_features)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, Float8FrozenLinear.from_linear(m))
    return len(targets)


def check_fp8_device(device: torch.device) -> None:
    """Refuse fp8 matmuls where they do not run fast: they need a CUDA GPU with compute capability
    8.9 or newer (Ada, Hopper, Blackwell)."""
    if device.type != "cuda":
        raise QfluxError(
            f"train.fp8_matmul: true needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+); "
            f"this run trains on {device.type}. Set train.fp8_matmul: false"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise QfluxError(
            f"train.fp8_matmul: true needs compute capability 8.9+ (Ada/Hopper); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}. Set train.fp8_matmul: false"
        )
