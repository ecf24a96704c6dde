"""Frozen base weights stored in fewer bits (``model.quantize``): fp8, or 4-bit nf4 / fp4.

The frozen linears of a model (the transformer, and with ``model.quantize_text_encoders`` the text
encoders) keep their weights quantized and compute in the activation dtype (bf16); the LoRA is not
touched (fp32, substituted per call) and is saved in the same diffusers format as always, so it
loads into the bf16 pipeline.

**fp8** (:class:`Float8StorageLinear`): float8_e4m3fn with one scale per output channel,

    s[o] = amax_i |W[o, i]| / 448        W₈ = sat(W / s)        y = x · (s ⊙ W₈)ᵀ + b

dequantized to the activation dtype inside the call, for the forward product and again for the
input gradient ∂x = ∂y · (s ⊙ W₈); only W₈ and s are kept between forward and backward. Why not
diffusers' layerwise casting (``enable_layerwise_casting``): it casts the module's weight to bf16
before each forward and back after, so autograd keeps every layer's bf16 copy alive until backward
(training memory is not saved), and it casts without a scale, so weights below e4m3's normal range
(2⁻⁶) lose most of their bits. ``benchmarks/precision.py`` measures both.

**nf4 / fp4**: bitsandbytes' ``Linear4bit`` (blocks of 64 weights share an absmax; nf4's levels
follow a normal distribution). Its forward and backward run on CPU as well as CUDA, so this path is
tested here. Its autograd function has no torch.func support, so the step uses the autograd engine.
On CPUs with AVX-512 BF16, bitsandbytes repacks a layer's weight for its inference kernel the first
time the layer runs in eval mode on an input without gradient (blocks of 32 output rows, whole
absmax blocks per row). So a layer is stored in 4 bits only where that layout exists on every
device (:func:`fits_4bit`: out % 32 = 0 and in % 64 = 0; every linear of the real models); the
others stay in the compute dtype and are counted (:func:`count_layers`). The repacked layout has no
backward, so training keeps the 4-bit layers in training mode (:func:`keep_trainable_layout`),
where bitsandbytes never repacks; predict and the encoders take the fast kernel.

Layers kept in full precision: the final projection (``proj_out``), T5's ``wo`` and the LoRA's own
layers (:data:`KEEP`).
bitsandbytes and torchao (its float8 scaling helpers) are optional extras, ``qflux[4bit]`` and
``qflux[fp8]``; a config that needs a missing one stops with a sentence naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from qflux.config.errors import QfluxError, optional
from qflux.weights.fp8 import FP8, SelfDequantizing, dequantize, quantize_rowwise
from qflux.weights.shell import linear_shell

Quantize = Literal["none", "fp8", "nf4", "fp4"]
QUANTIZE = ("none", "fp8", "nf4", "fp4")
KEEP = re.compile(r"^(proj_out|lm_head)$|(^|\.)(wo|lora_A|lora_B)(\.|$)")
"""Module paths kept in full precision: the final projection to latents (or logits), T5's ``wo``
(T5 casts its activations to that weight's dtype, and keeps it in fp32 by design) and the LoRA's own
layers (as bitsandbytes-quantized diffusers checkpoints keep ``proj_out``)."""


BLOCK_4BIT = 64
"""Weights per absmax block of bitsandbytes' 4-bit quantization (its default blocksize)."""
ROWS_4BIT = 32
"""Output rows per block of bitsandbytes' packed CPU layout (``_convert_weight_packed_for_cpu``)."""


def fits_4bit(out_features: int, in_features: int) -> bool:
    """Whether bitsandbytes' 4-bit kernels take a [out, in] weight on every device: the packed CPU
    layout needs whole blocks of 32 output rows and whole absmax blocks of 64 along each row."""
    return out_features % ROWS_4BIT == 0 and in_features % BLOCK_4BIT == 0


class _StoredFp8Fn(torch.autograd.Function):
    """y = x·(s ⊙ W₈)ᵀ + b in x's dtype; gradient for x only, from the fp8 weight again."""

    @staticmethod
    def forward(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return nn.functional.linear(x, dequantize(w8, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        w8, scale = ctx.saved_tensors
        return grad @ dequantize(w8, scale, grad.dtype), None, None, None  # ∂x = ∂y · (s ⊙ W₈)


class Float8StorageLinear(SelfDequantizing, nn.Linear):
    """A frozen linear layer stored as float8_e4m3fn ``weight`` [out, in] with ``weight_scale``
    [out, 1] float32, computed in the activation dtype (see the module docstring)."""

    weight_scale: torch.Tensor
    compute_dtype: torch.dtype
    """The dtype the layer computes in (peft gives an adapter on it this dtype, as for bitsandbytes)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8StorageLinear:
        """Quantize ``linear``'s weight; bias (in its dtype) and device are kept."""
        w8, scale = quantize_rowwise(linear.weight.detach())
        return cls.from_quantized(w8, scale, linear.bias, linear.weight.dtype)

    @classmethod
    def from_quantized(
        cls, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype
    ) -> Float8StorageLinear:
        """Wrap an already-quantized weight (a pre-quantized checkpoint): scale [out, 1] or a scalar."""
        new = linear_shell(cls, w8.shape[1], w8.shape[0])  # w8: [out, in]
        new.compute_dtype = compute_dtype
        new.weight = nn.Parameter(w8.to(FP8), requires_grad=False)
        new.register_buffer("weight_scale", scale.float().reshape(-1, 1).expand(w8.shape[0], 1).contiguous())
        new.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)  # type: ignore[assignment]
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StoredFp8Fn.apply(x, self.weight, self.weight_scale, self.bias)


def bitsandbytes() -> Any:
    """The bitsandbytes module, or a clear error naming the extra to install."""
    return optional(
        "bitsandbytes", extra="4bit", needed_by="model.quantize: nf4/fp4", otherwise="set model.quantize: none"
    )


def linear_4bit(linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
    """bitsandbytes ``Linear4bit`` holding ``linear``'s weight quantized (nf4 or fp4, blocks of 64)."""
    bnb = bitsandbytes()
    device = linear.weight.device
    new = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type=quant_type,
        device="meta",
    )
    weight = linear.weight.detach().to("cpu", compute_dtype)
    new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=False)
    return new.to(device)  # bitsandbytes quantizes when the weight moves to its device


def frozen_linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The plain frozen ``nn.Linear`` layers of ``module`` outside :data:`KEEP`, by path."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if type(m) is nn.Linear and not m.weight.requires_grad and not KEEP.search(name)
    ]


def quantize_frozen(module: nn.Module, mode: str, *, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen ``nn.Linear`` weights of ``module`` in ``mode`` (fp8, nf4, fp4), in place.

    Layers whose path matches :data:`KEEP` stay as they are; with a LoRA injected, its own
    ``lora_A`` / ``lora_B`` layers are kept and the adapted ``base_layer`` is quantized. In 4 bits,
    layers whose shape bitsandbytes cannot take everywhere (:func:`fits_4bit`) are kept too.

    Returns:
        How many layers were converted (0 for ``none``).
    """
    if mode == "none":
        return 0
    if mode not in QUANTIZE:
        raise QfluxError(f"model.quantize must be one of {', '.join(QUANTIZE)}; got {mode!r}")
    if mode != "fp8":
        bitsandbytes()  # the extra is needed even when no layer of this model fits 4 bits
    targets = [
        (name, m) for name, m in frozen_linears(module) if mode == "fp8" or fits_4bit(m.out_features, m.in_features)
    ]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        new = Float8StorageLinear.from_linear(m) if mode == "fp8" else linear_4bit(m, mode, compute_dtype)
        setattr(parent, child, new)
    return len(targets)


def storage_by_component(model: Any) -> dict[str, str]:
    """{component: how its frozen linears are stored} of a config's model section: ``quantize`` for
    the transformer and, with ``quantize_text_encoders``, for the text encoders."""
    text = model.quantize if model.quantize_text_encoders else "none"
    return {"transformer": model.quantize, "text_encoder": text, "text_encoder_2": text}


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` holds its weight quantized (fp8 storage, or a bitsandbytes 4-bit weight)."""
    return isinstance(layer, Float8StorageLinear) or hasattr(getattr(layer, "weight", None), "quant_state")


@attrs.frozen
class LayerCount:
    """How a model's frozen linear layers are stored (the start summary prints it)."""

    quantized: int
    """Layers stored quantized (fp8 or 4-bit)."""
    kept: int
    """Frozen linears left in the compute dtype although quantization is on: a shape the 4-bit
    kernels cannot take (:func:`fits_4bit`). Layers kept by design (:data:`KEEP`) are not counted."""


def count_layers(module: nn.Module, mode: str) -> LayerCount:
    """Count ``module``'s quantized linears and the frozen ones that quantization in ``mode`` left
    as they were (none when ``mode`` is 'none')."""
    if mode == "none":
        return LayerCount(quantized=0, kept=0)
    quantized = sum(1 for m in module.modules() if is_quantized(m))
    kept = sum(
        1
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and not is_quantized(m) and not m.weight.requires_grad and not KEEP.search(name)
    )
    return LayerCount(quantized=quantized, kept=kept)


def keep_trainable_layout(module: nn.Module) -> int:
    """Put ``module``'s bitsandbytes 4-bit layers in training mode, in place, so bitsandbytes keeps
    their weight in the layout that has a backward (it repacks eval-mode layers for its AVX-512 BF16
    inference kernel, which has none). Nothing else changes: the layers have no dropout.

    Returns:
        How many layers were switched.
    """
    layers = [m for m in module.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    for m in layers:
        m.train()
    return len(layers)


def share_code_tables(module: nn.Module) -> int:
    """Point every bitsandbytes 4-bit layer's code tables (the 16 nf4/fp4 levels and the 256-entry
    map of the nested absmax quantization: constants, 1.1 KiB a layer) at one shared copy per
    device, in place. bitsandbytes gives each layer its own copy, and makes new ones when a
    module moves, so this runs after the move.

    Returns:
        How many tables now point at a shared copy.
    """
    shared: list[torch.Tensor] = []
    n = 0
    for m in module.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        while state is not None:
            if state.code is not None:
                same = next((t for t in shared if t.device == state.code.device and torch.equal(t, state.code)), None)
                if same is None:
                    shared.append(state.code)
                elif same is not state.code:
                    state.code, n = same, n + 1
            state = getattr(state, "state2", None)
    return n


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, 4-bit quantization statistics included; a
    tensor held by several layers (bitsandbytes' shared code tables) counts once."""
    seen: dict[tuple[int, int], int] = {}

    def add(t: torch.Tensor) -> None:
        if t.numel():
            seen[(t.untyped_storage().data_ptr(), int(t.storage_offset()))] = t.numel() * t.element_size()

    for t in (*module.parameters(), *module.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:  # bitsandbytes: absmax per block (and its own nested statistics)
            add(state.absmax)
            if state.code is not None:
                add(state.code)
            state = getattr(state, "state2", None)
    return sum(seen.values())


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def prequantized_kind(folder: Path) -> str | None:
    """How a component folder's checkpoint is already quantized: 'nf4' / 'fp4' (a bitsandbytes
    4-bit diffusers save: ``quantization_config`` in config.json), 'fp8' (float8 weights, with
    ``<layer>.scale_weight`` or ``<layer>.weight_scale`` scales), or None for a plain checkpoint."""

    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    q = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config") or {}
    if q.get("quant_method") == "bitsandbytes" and q.get("load_in_4bit"):
        return str(q.get("bnb_4bit_quant_type", "fp4"))
    for f in _checkpoint_files(folder):
        try:
            with safe_open(str(f), "pt") as h:
                if any(h.get_slice(k).get_dtype() == "F8_E4M3" for k in h.keys()):  # noqa: SIM118
                    return "fp8"
        except Exception:  # an unreadable file: the regular loader reports it with the folder
            return None
    return None


def load_prequantized(cls: Any, folder: Path, dtype: torch.dtype, kind: str, files: Sequence[Path] = (),
                      state_dict: Mapping[str, torch.Tensor] | None = None) -> Any:  # fmt: skip
    """A model whose linear layers are read quantized from a pre-quantized checkpoint (see
    :func:`prequantized_kind`); every other tensor is cast to ``dtype``.

    Args:
        files: the checkpoint's files (default: the folder's ``*.safetensors``); the folder gives the config.
        state_dict: the checkpoint's tensors themselves (instead of files).

    Raises:
        QfluxError: the checkpoint lacks tensors the model needs (names the first ones).
    """

    config = dict(cls.load_config(folder))
    config.pop("quantization_config", None)
    model = _empty_model(cls, config, dtype)
    sd: dict[str, torch.Tensor] = dict(state_dict or {})
    for f in () if state_dict is not None else files or _checkpoint_files(folder):
        sd.update(load_file(str(f)))
    replaced: set[str] = set()
    for name, m in list(model.named_modules()):
        w = sd.get(f"{name}.weight")
        if type(m) is not nn.Linear or w is None or w.dtype not in (FP8, torch.uint8):
            continue
        stats = {k[len(name) + 8 :]: sd.pop(k) for k in [k for k in sd if k.startswith(f"{name}.weight.")]}
        bias = sd.pop(f"{name}.bias", None)
        sd.pop(f"{name}.weight")
        if w.dtype == FP8:
            scale = sd.pop(f"{name}.scale_weight", sd.pop(f"{name}.weight_scale", torch.ones(())))
            new: nn.Module = Float8StorageLinear.from_quantized(
                w, scale, None if bias is None else bias.to(dtype), dtype
            )
        else:
            new = _prequantized_4bit(m, w, stats, bias, kind, dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced.add(name)
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items() if k != "scaled_fp8"}
    missing, _ = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in replaced and not k.endswith("weight_scale")]
    if missing or not replaced:
        raise QfluxError(
            f"'{folder}' holds a {kind} checkpoint this model cannot read: "
            + (f"missing {', '.join(missing[:3])}" if missing else "no quantized linear layer matched the model")
        )
    return model


def _empty_model(cls: Any, config: dict[str, Any], dtype: torch.dtype) -> Any:
    """The model built from its config in ``dtype`` without running weight initialisers (every
    weight is overwritten from the checkpoint)."""
    # deferred: diffusers is a heavy import
    from diffusers.models.modeling_utils import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            return cls.from_config(config)
    finally:
        torch.set_default_dtype(previous)


def _prequantized_4bit(
    linear: nn.Linear,
    packed: torch.Tensor,
    stats: dict[str, torch.Tensor],
    bias: torch.Tensor | None,
    kind: str,
    dtype: torch.dtype,
) -> nn.Module:
    """bitsandbytes ``Linear4bit`` from a saved packed weight and its quantization statistics; a
    layer whose shape does not fit every device's kernel (:func:`fits_4bit`) is dequantized to a
    plain linear in ``dtype``."""
    bnb = bitsandbytes()
    new = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=bias is not None, compute_dtype=dtype, quant_type=kind
    )
    new.weight = bnb.nn.Params4bit.from_prequantized(
        data=packed, quantized_stats=stats, requires_grad=False, device=packed.device
    )
    if not fits_4bit(linear.out_features, linear.in_features):
        weight = bnb.functional.dequantize_4bit(new.weight.data, new.weight.quant_state).to(dtype)
        plain = nn.Linear(linear.in_features, linear.out_features, bias=bias is not None, device="meta")
        plain.weight = nn.Parameter(weight.reshape(linear.out_features, linear.in_features), requires_grad=False)
        if bias is not None:
            plain.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return plain
    if bias is not None:
        new.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return new
