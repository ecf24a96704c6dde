"""Frozen linear layers whose backward runs the fast GEMM layout on CPUs without native bf16.

A frozen ``y = x·Wᵀ + b`` needs one product in backward, the input gradient ``∂x = ∂y·W``. With
both operands row-major (autograd's choice) that is the "NN" layout, which oneDNN/MKL run about
15× slower in bfloat16 than the forward's "NT" layout on CPUs lacking AVX512-BF16/AMX (measured on
this project's AVX2 CI machine: 1082 ms against 65 ms for a [2176, 1024]·[1024, 256] product). On
CPUs with native bf16 GEMMs the column-major hand-over is the slower one (about 2×), so the layout
is chosen by measuring both once (:func:`column_major_is_faster`).
Handing the GEMM the gradient in column-major order, ``(∂yᵀ)ᵀ·W``, picks the fast kernel; the
arithmetic is the same bf16 product with fp32 accumulation, so results agree to rounding.

Nothing else changes: no weight gradient is computed (the weight is frozen), and less is saved
for backward than by ``nn.Linear`` (the weight only, which is stored anyway).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qflux.weights.fp8 import check_fp8_device, use_fp8_matmul
from qflux.weights.quantize import keep_trainable_layout
from qflux.weights.shell import linear_shell

REDUCED_PRECISION = (torch.bfloat16, torch.float16)


class _FrozenLinearFn(torch.autograd.Function):
    """``F.linear`` for a weight and bias that take no gradient."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # [M, out]
        # ∂x = ∂y · W  [M, in], with ∂y handed over column-major (the fast reduced-precision layout)
        gx = g.t().contiguous().t() @ weight
        return gx.view(*grad.shape[:-1], weight.shape[1]), None, None


class FrozenLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters and state dict) whose backward is :class:`_FrozenLinearFn`.

    Used only while the weight takes no gradient; otherwise it is a plain ``nn.Linear``.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FrozenLinear:
        """A ``FrozenLinear`` holding ``linear``'s own parameters (shared, not copied)."""
        new = linear_shell(cls, linear.in_features, linear.out_features)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return super().forward(x)
        return _FrozenLinearFn.apply(x, self.weight, self.bias)


def needs_fast_frozen_linear(weight: torch.Tensor) -> bool:
    """True where the layout matters: reduced-precision weights on a CPU whose GEMM runs the
    column-major input gradient clearly faster (:func:`column_major_is_faster`, measured once).

    CUDA's cuBLAS runs every layout at the same speed, so GPUs keep ``nn.Linear``. CPUs with native
    bf16 GEMMs (AVX-512 BF16, AMX) run the row-major product faster, so they keep it too; torch
    reports both kinds of AVX-512 CPU alike, which is why this is measured, not looked up.
    """
    if weight.device.type != "cpu" or weight.dtype not in REDUCED_PRECISION:
        return False
    return column_major_is_faster(weight.dtype)


@functools.cache
def column_major_is_faster(dtype: torch.dtype, shape: tuple[int, int, int] = (2048, 256, 1024)) -> bool:
    """Whether ``(∂yᵀ)ᵀ·W`` beats ``∂y·W`` by at least 1.5× in ``dtype`` on this CPU: the best of 3
    timings of each on a [M, out]·[out, in] product (about 20 ms in all, once per process).

    On AVX2 CPUs without native bf16 the column-major product is about 15× faster; on AVX-512 BF16
    ones it is about 2× slower, so the 1.5 margin never flips on timing noise."""
    m, n_out, n_in = shape
    g = torch.randn(m, n_out).to(dtype)
    w = torch.randn(n_out, n_in).to(dtype)

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    row_major = best(lambda: g @ w)
    column_major = best(lambda: g.t().contiguous().t() @ w)
    return column_major * 1.5 < row_major


def use_fast_frozen_linear(module: nn.Module, *, force: bool = False) -> int:
    """Replace every frozen plain ``nn.Linear`` in ``module`` that :func:`needs_fast_frozen_linear`
    (or every frozen one, with ``force``) by a :class:`FrozenLinear` sharing its parameters, in
    place (names and state dict are kept).

    Not for ``train.compile: true``: under ``torch.compile`` of a ``torch.func.grad`` transform,
    torch 2.13 drops the gradient through a custom ``autograd.Function`` (every LoRA gradient
    comes out zero), so :func:`qflux.train.state.make_train_step` refuses that combination.

    Returns:
        How many layers were converted.
    """
    targets = [
        (name, m)
        for name, m in module.named_modules()
        if type(m) is nn.Linear and not m.weight.requires_grad and (force or needs_fast_frozen_linear(m.weight))
    ]
    for name, m in targets:
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, FrozenLinear.from_linear(m))
    return len(targets)


def prepare_frozen_base(
    module: nn.Module, *, fp8_matmul: bool, device: torch.device, compile_mode: str = "none"
) -> dict[str, int]:
    """Choose the kernels of the frozen base for training on ``device``, in place.

    ``fp8_matmul`` turns the large frozen linears into fp8 ones (:mod:`qflux.weights.fp8`; CUDA 8.9+ only,
    refused elsewhere with the reason); the remaining frozen linears get the fast backward layout
    where :func:`needs_fast_frozen_linear` says it matters, except under ``compile_mode='full'``
    (see :func:`use_fast_frozen_linear`). bitsandbytes 4-bit layers stay in the layout that has a
    backward (:func:`qflux.weights.quantize.keep_trainable_layout`).

    Returns:
        {'fp8': layers converted to fp8, 'fast_backward': layers given the fast layout,
        '4bit_trainable': 4-bit layers kept in their trainable layout}.
    """

    n8 = 0
    if fp8_matmul:
        check_fp8_device(device)
        n8 = use_fp8_matmul(module)
    fast = 0 if compile_mode == "full" else use_fast_frozen_linear(module)
    return {"fp8": n8, "fast_backward": fast, "4bit_trainable": keep_trainable_layout(module)}
