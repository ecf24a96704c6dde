"""Peak device memory of one training step, measured on fake tensors: no weights, no GPU.

The model is built from its ``config.json`` on the meta device, quantized and given its LoRA as
training would, then every parameter and buffer becomes a ``FakeTensor`` (torch's tensors with a
shape, dtype and device but no memory). One real training step (the recipe's own loss, the
autograd engine, gradient checkpointing and block swap as configured, AdamW) runs on them while
:class:`LiveBytes` counts the bytes of every storage an operation creates and drops when the
storage is freed. The peak is then

    peak = weights + state + activations + transient + allowance

- weights: the frozen weights resident on the device, as stored (bf16, fp8 with its scales, or
  4 bits with their statistics), the swapped blocks' excepted;
- state: the LoRA (the module's copy and the fp32 trained one) and AdamW's two moments;
- activations: what is alive when backward starts (the tensors saved for it, the batch);
- transient: the largest excess over that during the step (backward's gradients, recomputed
  blocks, the weights of swapped layers in flight, AdamW's temporaries);
- allowance: a stated constant for what no tensor shows (:data:`ALLOWANCE`).

The fake tensors live on the CPU device: the CPU build cannot place fake CUDA tensors in indexing
operations. Attention then takes the CPU flash kernel, whose memory is that of CUDA's (the output
and one log-sum-exp per row, never the N×N scores). bitsandbytes' 4-bit layers cannot hold fake
tensors; :class:`Fake4bit` stands in with their storage (packed 4-bit weight, 8-bit absmax per 64
weights, fp32 statistics per 256 blocks) and their use of memory (the weight dequantized in the
compute dtype for each product, forward and backward).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qflux.weights.shell import linear_shell

GIB = 2**30
ALLOWANCE = int(1.0 * GIB)
"""What no tensor shows on a CUDA device: the context (about 0.5 GiB with cuBLAS and cuDNN loaded),
their workspaces, and the caching allocator's rounding and fragmentation."""
BLOCK_4BIT = 64
"""Weights per absmax of bitsandbytes' 4-bit blocks (qflux.weights.quantize)."""
BLOCKS_PER_STATISTIC = 256
"""4-bit absmax values per fp32 statistic of bitsandbytes' double quantization."""


@attrs.frozen
class Breakdown:
    """A step's peak device memory in bytes, by what holds it (see the module docstring)."""

    weights: int
    state: int
    activations: int
    transient: int
    allowance: int = ALLOWANCE

    @property
    def peak(self) -> int:
        return self.weights + self.state + self.activations + self.transient + self.allowance

    def as_gib(self) -> dict[str, float]:
        """{part: GiB} with the peak, rounded to 3 decimals."""
        parts = attrs.asdict(self) | {"peak": self.peak}
        return {k: round(v / GIB, 3) for k, v in parts.items()}


def _storage(t: torch.Tensor) -> Any:
    return t.untyped_storage()


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = _storage(t)
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that operations create, until each is freed.

    Storages of ``known`` tensors (the resident weights and state) are not counted. ``live`` is
    the current total, ``peak`` its maximum, ``at_backward`` its value when the first backward
    operation ran (what forward left for backward)."""

    def __init__(self, known: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.counted: dict[int, int] = {}
        self.known = {_storage(t)._cdata for t in known}
        self.live = self.peak = 0
        self.at_backward: int | None = None

    def _free(self, key: int) -> None:
        self.live -= self.counted.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.at_backward is None and torch._C._current_graph_task_id() != -1:
            self.at_backward = self.live
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = _storage(t)
            key = st._cdata
            if key in self.counted or key in self.known:
                continue
            self.counted[key] = st.nbytes()
            self.live += self.counted[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key)
        return out


def fake_mode() -> FakeTensorMode:
    """A fake-tensor mode for planning (real tensors may enter: they become fake)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def to_fake(module: nn.Module, mode: FakeTensorMode, device: torch.device | None = None) -> nn.Module:
    """Replace every parameter and buffer of a meta-device ``module`` by a fake tensor of the same
    shape and dtype on ``device`` (default: the CPU stand-in), in place (usable under ``mode``)."""
    convert = mode.fake_tensor_converter
    device = device or torch.device("cpu")

    def fake(t: torch.Tensor) -> torch.Tensor:
        return convert.from_meta_and_device(mode, t if t.is_meta else t.to("meta"), device)

    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = nn.Parameter(fake(p.data), requires_grad=p.requires_grad)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = fake(b)
    return module


class _Fake4bitFn(torch.autograd.Function):
    """y = x·Wᵀ + b with W dequantized from 4 bits for the product, forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                shape: tuple[int, int]) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(packed)
        ctx.shape = shape
        weight = torch.empty(shape, dtype=x.dtype, device=x.device)  # the dequantized weight (transient)
        return nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        weight = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
        return grad @ weight, None, None, None  # ∂x = ∂y·W


class Fake4bit(nn.Linear):
    """The storage and memory use of a bitsandbytes 4-bit ``Linear4bit`` (nf4/fp4, blocks of 64,
    double-quantized statistics), for planning only: its outputs are not the layer's values."""

    absmax: torch.Tensor
    statistics: torch.Tensor
    compute_dtype: torch.dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fake4bit:
        """The stand-in for ``linear`` stored in 4 bits (on ``linear``'s device, usually meta)."""
        new = linear_shell(cls, linear.in_features, linear.out_features)
        n = linear.out_features * linear.in_features
        blocks = math.ceil(n / BLOCK_4BIT)
        device = linear.weight.device
        new.weight = nn.Parameter(torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device), requires_grad=False)
        new.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
        # per 256 absmax: an fp32 scale and offset; plus the 256-entry fp32 code table of the 8-bit absmax
        new.register_buffer("statistics", torch.empty(2 * math.ceil(blocks / BLOCKS_PER_STATISTIC) + 256,
                                                      dtype=torch.float32, device=device))  # fmt: skip
        new.bias = linear.bias
        new.compute_dtype = linear.weight.dtype
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fake4bitFn.apply(x, self.weight, self.bias, (self.out_features, self.in_features))

    def stored(self) -> tuple[torch.Tensor, ...]:
        """The tensors the weight is stored in (what block swap moves: :mod:`qflux.weights.stored`)."""
        return self.weight, self.absmax, self.statistics

    def weight_from(self, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight [out, in] a swapped copy makes on its device (its values are not the layer's)."""
        return torch.empty(self.out_features, self.in_features, dtype=dtype, device=tensors[0].device)


def measure_step(
    run_step: Callable[[], Any], resident: Iterable[torch.Tensor], mode: FakeTensorMode
) -> tuple[int, int]:
    """Run ``run_step`` under ``mode`` counting what it allocates beyond ``resident``.

    Returns:
        (activations: bytes alive when backward started, transient: the peak's excess over that).
    """
    tracker = LiveBytes(resident)
    with mode, tracker:
        run_step()
    activations = tracker.at_backward if tracker.at_backward is not None else tracker.peak
    return activations, tracker.peak - activations


def resident_bytes(module: nn.Module, extra: Mapping[str, torch.Tensor] | Iterable[torch.Tensor] = (),
                   *, exclude: Iterable[torch.Tensor] = ()) -> int:  # fmt: skip
    """Bytes of ``module``'s parameters and buffers plus ``extra`` tensors, minus ``exclude``d ones
    (the swapped weights, on the host)."""
    skip = {_storage(t)._cdata for t in exclude}
    tensors = [*module.parameters(), *module.buffers()]
    tensors += list(extra.values()) if isinstance(extra, Mapping) else list(extra)
    return storage_bytes(t for t in tensors if _storage(t)._cdata not in skip)


def profiled_peak(fn: Callable[[], Any]) -> int:
    """The peak of the bytes ``fn`` allocates on the CPU beyond what existed before it, from torch's
    profiler memory timeline (every allocation and free): an independent measurement to hold the
    fake-tensor estimate against (tests, benchmarks/memory.py)."""

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    created: dict[Any, int] = {}
    for _, action, (key, _), size in sorted(prof._memory_profile().timeline, key=lambda event: event[0]):
        if action == Action.CREATE:
            created[key] = size
            live += size
        elif action == Action.DESTROY and key in created:  # what existed before is not counted
            live -= created.pop(key)
        peak = max(peak, live)
    return peak
