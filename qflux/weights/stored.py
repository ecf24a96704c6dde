"""How a frozen linear layer stores its weight: the tensors that hold it and how W [out, in] is made from them
(what block swap moves to the host and back, :mod:`qflux.weights.block_swap`).

| layer | stored tensors | W |
| --- | --- | --- |
| ``nn.Linear``, ``FrozenLinear`` | W | W |
| ``Float8StorageLinear`` | W₈ [out, in], s [out, 1] | s ⊙ W₈ in the compute dtype |
| bitsandbytes ``Linear4bit`` | W₄ [out·in/2, 1], absmax, code (nested: offset, absmax₂, code₂) | dequantized |
| with ``stored()``, ``weight_from(tensors, dtype)`` | its own (the planner's 4-bit stand-in) | its own |

A 4-bit W is rebuilt as bitsandbytes' own backward rebuilds it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from qflux.weights.fp8 import dequantize
from qflux.weights.quantize import Float8StorageLinear

Rebuild = Callable[[tuple[torch.Tensor, ...], torch.dtype], torch.Tensor]
"""``rebuild(tensors, dtype)``: W [out, in] in ``dtype`` from the stored tensors (on any device)."""


def stored_weight(layer: nn.Linear) -> tuple[tuple[torch.Tensor, ...], Rebuild]:
    """The tensors ``layer`` stores its weight in, and how W is rebuilt from copies of them."""
    own: Any = layer
    if hasattr(own, "stored") and hasattr(own, "weight_from"):
        return own.stored(), own.weight_from
    if isinstance(layer, Float8StorageLinear):
        return (layer.weight, layer.weight_scale), lambda t, dtype: dequantize(t[0], t[1], dtype)
    state = getattr(layer.weight, "quant_state", None)
    if state is not None:
        return (layer.weight.data, *_state_tensors(state)), partial(_dequantize_4bit, state)
    return (layer.weight,), lambda t, dtype: t[0]


def _state_tensors(state: Any) -> tuple[torch.Tensor, ...]:
    """A bitsandbytes ``QuantState``'s tensors: absmax, code (+ nested: offset, absmax₂, code₂)."""
    nested = (state.offset, state.state2.absmax, state.state2.code) if state.nested else ()
    return (state.absmax, state.code, *nested)


def _dequantize_4bit(template: Any, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] in ``dtype`` from copies of a 4-bit layer's tensors (:func:`_state_tensors` after the packed
    weight); ``template``: the layer's ``QuantState`` (its shape, block sizes, type and dtypes)."""
    # deferred: bitsandbytes is an extra
    from bitsandbytes.functional import QuantState, dequantize_4bit

    packed, absmax, code, *nested = tensors
    state2, offset = None, None
    if nested:
        offset, absmax2, code2 = nested
        state2 = QuantState(
            absmax=absmax2, code=code2, blocksize=template.state2.blocksize, dtype=template.state2.dtype
        )
    state = QuantState(absmax=absmax, shape=template.shape, code=code, blocksize=template.blocksize,
                       quant_type=template.quant_type, dtype=template.dtype, offset=offset, state2=state2)  # fmt: skip
    return dequantize_4bit(packed, state).to(dtype)
