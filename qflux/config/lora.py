"""The adapter section of a recipe's model (``model.lora``): which kind, rank and layers, handed to peft."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import attrs
from attrs import validators as v

from qflux.config.validators import init_lora, positive


def _names(names: Iterable[str]) -> tuple[str, ...]:
    """A list of module names (a YAML list, or a tuple) as a tuple."""
    return tuple(names)


@attrs.frozen
class LoraConfig:
    """Adapter settings, handed to peft (``LoraConfig``, ``LoHaConfig``, ``LoKrConfig``)."""

    kind: Literal["lora", "dora", "lokr", "loha"] = attrs.field(
        default="lora", validator=v.in_(("lora", "dora", "lokr", "loha"))
    )
    """'lora': ΔW = (α/r)·B·A. 'dora': LoRA with a learned magnitude per output row (peft's
    use_dora), W' = m·(W + ΔW)/‖W + ΔW‖. 'lokr': ΔW = (α/r)·(W1 ⊗ W2), a Kronecker product (W2
    low-rank where r is below half its size). 'loha': ΔW = (α/r)·(W1a·W1b) ⊙ (W2a·W2b), a Hadamard
    product of two rank-r products. diffusers loads lora and dora files; ComfyUI loads lora, lokr
    and loha (docs/flux_kontext_configuration_guide.md, "Adapters and optimizers")."""
    r: int = attrs.field(default=16, validator=[v.instance_of(int), positive])
    """Rank of the low-rank update ΔW = B·A (A: [r, in], B: [out, r])."""
    lora_alpha: float = attrs.field(default=16, validator=positive)
    """Scale numerator: the update is (lora_alpha / r)·B·A (every kind scales by lora_alpha / r)."""
    init_lora_weights: bool | str = attrs.field(default="gaussian", validator=init_lora)
    """peft init: 'gaussian' (A ~ N(0, 1/r), B = 0), true (Kaiming A, B = 0), false (both random).
    lokr and loha: 'gaussian' and true start at ΔW = 0 (peft's init: one factor zero), false random."""
    target_modules: tuple[str, ...] = attrs.field(default=("to_k", "to_q", "to_v", "to_out.0"), converter=_names)
    """Module names (suffixes) of the transformer that get an adapter; [all-linear]: every linear layer
    (a module whose output never reaches the loss, such as Qwen-Image's last text stream, is named at
    the start and keeps ΔW = 0)."""
    pretrained_weight: str | None = None
    """A LoRA file to continue training from (diffusers, ComfyUI or kohya format); its rank and
    modules must match r and target_modules. null: start from the init."""
