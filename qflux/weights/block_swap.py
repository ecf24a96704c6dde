"""Block swap (``train.blocks_to_swap``): the frozen linear weights of the last N transformer blocks
live in (pinned) host memory and visit the device only while a layer uses them.

Each swapped linear computes

    y = x·Wᵀ + b            forward:  W fetched to the device, used, released
    ∂x = ∂y·W               backward: W fetched again (nothing but the layer is saved for it)

so at most the layer in use and the next block's prefetched weights are on the device. Entering
swapped block i starts copying block i+1's weights on a side stream (CUDA); in backward (and in the
forward recomputation of a checkpointed block) the prefetch walks the other way. Gradient
checkpointing recomputes a block's forward inside backward: its weights are then kept until that
block's backward has used them. LoRA layers, norms and biases (under 0.1% of a block's bytes) stay
on the device; the LoRA of a swapped block trains as any other.

The arithmetic is the layer's own (:mod:`qflux.weights.stored`): a bf16/fp32 weight is used as stored (with
:class:`FrozenLinear`'s column-major hand-over where the replaced layer had it), an fp8-stored weight is
dequantized as :class:`qflux.weights.quantize.Float8StorageLinear` does, so a run with swap gives the LoRA of
the run without it (identical on CPU, tested). A bitsandbytes 4-bit layer travels packed (with its
statistics) and is dequantized on the device for the product, as bitsandbytes' backward (and its default
forward kernel) computes it: the layer's output and gradient bit for bit on CPU, tested. ``train.fp8_matmul``
layers are not swapped (:func:`swap_problem` refuses them before loading).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qflux.weights.frozen_linear import FrozenLinear, needs_fast_frozen_linear
from qflux.weights.quantize import Float8StorageLinear
from qflux.weights.shell import linear_shell
from qflux.weights.stored import Rebuild, stored_weight

ADAPTER = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B)(\.|$)")
"""peft's adapter layers: trained, so they stay on the device."""


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a diffusers transformer (its ``_repeated_blocks`` classes), in forward
    order (FLUX.1: the 19 double-stream blocks, then the 38 single-stream ones)."""
    names = set(getattr(module, "_repeated_blocks", ()) or ())
    return [m for m in module.modules() if type(m).__name__ in names]


def block_count(config: dict[str, Any]) -> int:
    """How many repeated blocks a transformer config describes (``num_layers`` plus, for FLUX.1,
    ``num_single_layers``)."""
    return int(config.get("num_layers", 0)) + int(config.get("num_single_layers", 0))


def swap_problem(blocks_to_swap: int, *, blocks: int, quantize: str, fp8_matmul: bool, compile_mode: str,
                 fsdp: bool) -> str | None:  # fmt: skip
    """Why ``train.blocks_to_swap`` cannot serve this run (one sentence naming the keys), or None."""
    if blocks_to_swap == 0:
        return None
    if blocks_to_swap > blocks:
        return f"train.blocks_to_swap: {blocks_to_swap} is more than the transformer's {blocks} blocks"
    if fp8_matmul:
        return "train.blocks_to_swap cannot serve train.fp8_matmul layers; set one of them off"
    if compile_mode != "none":
        return (
            "train.blocks_to_swap moves weights from Python between operations, which torch.compile cannot trace; "
            "set train.compile: false"
        )
    if fsdp:
        return "train.blocks_to_swap and train.distributed: fsdp both move the frozen base; choose one"
    return None


class _SwappedLinearFn(torch.autograd.Function):
    """y = x·Wᵀ + b with W fetched from the host for forward and again for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, layer: SwappedLinear) -> torch.Tensor:
        ctx.layer = layer
        needs_backward = x.requires_grad and torch.is_grad_enabled()
        return F.linear(x, layer.fetch(x.dtype, needs_backward), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        layer: SwappedLinear = ctx.layer
        weight = layer.fetch(grad.dtype)
        g = grad.reshape(-1, grad.shape[-1])  # [M, out]
        if layer.column_major:  # FrozenLinear's hand-over: ∂y column-major (qflux.weights.frozen_linear)
            g = g.t().contiguous().t()
        return (g @ weight).view(*grad.shape[:-1], weight.shape[1]), None, None  # ∂x = ∂y·W  [..., in]


class SwappedLinear(nn.Linear):
    """A frozen linear layer whose stored weight (with an fp8 scale or 4-bit statistics) stays on the host; see
    the module docstring.

    ``weight`` is the host tensor (same name and state-dict entry as the layer it replaces)."""

    stored: tuple[torch.Tensor, ...]
    """The host tensors W is rebuilt from (:func:`qflux.weights.stored.stored_weight`), ``weight`` first."""
    rebuild: Rebuild
    swapper: Swapper
    block: int
    """Index of the layer's block among the swapped ones (forward order)."""
    column_major: bool
    """Whether backward hands ∂y over column-major, as :class:`FrozenLinear` does where it is faster."""

    @classmethod
    def from_layer(cls, layer: nn.Linear, swapper: Swapper, block: int, host: torch.device) -> SwappedLinear:
        """Move ``layer``'s stored weight to ``host`` (pinned when the device is CUDA); its bias goes to the
        device."""
        new = linear_shell(cls, layer.in_features, layer.out_features)
        # the backward layout the layer would have had on the device (FrozenLinear's, on some CPUs)
        new.column_major = isinstance(layer, FrozenLinear) or (
            type(layer) is nn.Linear and swapper.device.type == "cpu" and needs_fast_frozen_linear(layer.weight)
        )
        tensors, rebuild = stored_weight(layer)
        stored = tuple(swapper.to_host(t.detach(), host) for t in tensors)
        new.weight = nn.Parameter(stored[0], requires_grad=False)
        if isinstance(layer, Float8StorageLinear):  # its scale keeps its state-dict entry
            new.register_buffer("weight_scale", stored[1])
        # the weight parameter itself, then its scale or 4-bit statistics
        object.__setattr__(new, "stored", (new.weight, *stored[1:]))
        object.__setattr__(new, "rebuild", rebuild)
        new.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(swapper.device),
                                                                 requires_grad=False)  # fmt: skip
        object.__setattr__(new, "swapper", swapper)  # not a submodule
        object.__setattr__(new, "block", block)
        return new

    def host_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors that travel: the stored weight and its scale or statistics."""
        return self.stored

    def fetch(self, dtype: torch.dtype, needs_backward: bool = False) -> torch.Tensor:
        """This layer's weight on the device, [out, in] (a quantized one rebuilt in ``dtype``).

        ``needs_backward``: called by a forward whose backward will fetch the weight again."""
        return self.rebuild(self.swapper.take(self, needs_backward), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwappedLinearFn.apply(x, self.bias, self)


class Swapper:
    """The swapped layers of one transformer, their prefetched device copies and the copy stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.blocks: list[list[SwappedLinear]] = []
        self.ready: dict[int, tuple[tuple[torch.Tensor, ...], Any]] = {}
        """{id(layer): (device tensors, the copy's CUDA event or None)}."""
        self.pending: set[int] = set()
        """Layers whose forward ran with an input that takes a gradient: their backward will come."""
        self.cleanup_task = -1
        """The backward pass (autograd graph task) that clears what is left when it ends."""
        self.copies = 0
        """Host → device copies made so far (tests and benchmarks read it)."""

    def host_tensors(self) -> list[torch.Tensor]:
        """The host copies of every swapped layer's frozen tensors."""
        return [t for layers in self.blocks for layer in layers for t in layer.host_tensors()]

    def to_host(self, t: torch.Tensor, host: torch.device) -> torch.Tensor:
        """``t`` on ``host``, pinned when the device is CUDA (asynchronous copies need it)."""
        t = t.to(host)
        return t.pin_memory() if self.device.type == "cuda" and torch.cuda.is_available() else t

    def _copy(self, layer: SwappedLinear) -> tuple[torch.Tensor, ...]:
        self.copies += 1
        return tuple(t.to(self.device, non_blocking=True, copy=True) for t in layer.host_tensors())

    def prefetch(self, block: int, *, backward: bool = False) -> None:
        """Start copying block ``block``'s weights to the device (on the side stream on CUDA); in
        ``backward``, only those of layers whose backward is still to come."""
        if not 0 <= block < len(self.blocks):
            return
        for layer in self.blocks[block]:
            if id(layer) in self.ready or (backward and id(layer) not in self.pending):
                continue
            if self.stream is None:
                self.ready[id(layer)] = (self._copy(layer), None)
                continue
            with torch.cuda.stream(self.stream):
                tensors = self._copy(layer)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.ready[id(layer)] = (tensors, event)

    def take(self, layer: SwappedLinear, needs_backward: bool = False) -> tuple[torch.Tensor, ...]:
        """``layer``'s device tensors: the prefetched copy (waited for) or a copy made now.

        In backward the previous block is prefetched, and the copies still unused when backward ends
        are dropped. A forward that runs inside backward (a checkpointed block recomputing) keeps
        its copy for the backward that follows."""
        task = torch._C._current_graph_task_id()
        if task != -1:
            self._clear_after(task)
            if not torch.is_grad_enabled():  # the backward proper (not a recomputation)
                self.pending.discard(id(layer))
                self.prefetch(layer.block - 1, backward=True)
        elif needs_backward:
            self.pending.add(id(layer))
        found = self.ready.get(id(layer))
        if found is None:
            tensors = self._copy(layer)
            if task != -1 and needs_backward:
                self.ready[id(layer)] = (tensors, None)
            return tensors
        tensors, event = found
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in tensors:  # made on the side stream, used on the compute stream
                t.record_stream(torch.cuda.current_stream(self.device))
        if not (task != -1 and needs_backward):
            del self.ready[id(layer)]
        return tensors

    def _clear_after(self, task: int) -> None:
        """Once per backward pass: when it ends, drop the copies nothing used."""
        if self.cleanup_task == task:
            return
        self.cleanup_task = task

        def clear() -> None:
            self.ready.clear()
            self.pending.clear()

        torch.autograd.Variable._execution_engine.queue_callback(clear)

    def entering(self, block: int) -> None:
        """Block ``block`` starts its forward: prefetch the next one (the previous one when this
        forward is a checkpointed block recomputing inside backward)."""
        self.prefetch(block - 1 if torch._C._current_graph_task_id() != -1 else block + 1)


def swap_blocks(module: nn.Module, n: int, device: torch.device, *, host: torch.device | None = None) -> Swapper:
    """Keep the frozen linear weights of ``module``'s last ``n`` blocks on the host and move the rest
    of ``module`` to ``device``, in place (names and state dict are kept).

    ``module`` is expected on the host (loaded there: the device never holds the swapped weights).

    Raises:
        ValueError: a swapped block holds a layer that cannot be swapped (fp8 matmul).
    """
    host = host or torch.device("cpu")
    swapper = Swapper(device)
    blocks = transformer_blocks(module)[-n:] if n else []
    for i, block in enumerate(blocks):
        layers = []
        for name, m in list(block.named_modules()):
            if not isinstance(m, nn.Linear) or m.weight.requires_grad or ADAPTER.search(name):
                continue
            if not swappable(m):
                raise ValueError(f"block swap cannot move {type(m).__name__} layers ({name})")
            parent, _, child = name.rpartition(".")
            new = SwappedLinear.from_layer(m, swapper, i, host)
            setattr(block.get_submodule(parent) if parent else block, child, new)
            layers.append(new)
        swapper.blocks.append(layers)
        block.register_forward_pre_hook(lambda _m, _a, i=i: swapper.entering(i))
    swapped = {id(t) for t in swapper.host_tensors()}
    _move_except(module, device, swapped)
    if blocks:
        module.register_forward_pre_hook(lambda _m, _a: swapper.prefetch(0))
    return swapper


def _move_except(module: nn.Module, device: torch.device, keep: set[int]) -> None:
    """Move every parameter and buffer of ``module`` to ``device`` except the tensors in ``keep``."""
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and id(p) not in keep and hasattr(p, "quant_state"):  # bitsandbytes moves its own
                m._parameters[k] = p.to(device)  # type: ignore[assignment]
            elif p is not None and id(p) not in keep:
                m._parameters[k] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for k, b in m._buffers.items():
            if b is not None and id(b) not in keep:
                m._buffers[k] = b.to(device)


def swappable(m: nn.Module) -> bool:
    """Whether block swap can move a frozen linear layer: a plain, fp8-stored or 4-bit one (bitsandbytes', or
    the planner's stand-in), not an fp8-matmul one."""
    four_bit = hasattr(getattr(m, "weight", None), "quant_state") or hasattr(m, "weight_from")
    return type(m) in (nn.Linear, FrozenLinear, Float8StorageLinear) or four_bit


def swapped_bytes(blocks: Sequence[nn.Module]) -> int:
    """Bytes of the frozen linear weights as stored (with fp8 scales, 4-bit statistics) of ``blocks``: what
    swapping them moves off the device."""
    total = 0
    for block in blocks:
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear) and not m.weight.requires_grad and not ADAPTER.search(name):
                total += sum(t.numel() * t.element_size() for t in stored_weight(m)[0])
    return total
