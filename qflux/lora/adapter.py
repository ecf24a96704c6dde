"""Adapters from peft (LoRA, and DoRA, LoKr, LoHa: :mod:`qflux.lora.kinds`), held outside the
module as a dict of tensors.

``inject_lora`` adds a peft adapter to the transformer and returns its initial tensors; the
module's own copy of one factor is then zeroed (B = 0 for LoRA), so calling the module *without*
the dict is the base model and calling it through ``functional_call(module, lora, ...)`` applies
the adapter:

    y = W·x + (α / r)·B·(A·x)

Saved LoRA and DoRA files are diffusers' format: ``transformer.``-prefixed ``lora_A`` / ``lora_B``
keys with the peft config in the safetensors metadata, which ``FluxKontextPipeline.load_lora_weights``
reads; LoKr and LoHa files are LyCORIS's (:func:`qflux.lora.kinds.to_lycoris`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.func import functional_call

from qflux.config.errors import QfluxError
from qflux.config.schema import LoraConfig
from qflux.lora.formats import NAMINGS, Delta, Naming, layer_names, module_out_features, split_lora, to_comfyui
from qflux.lora.kinds import (
    LYCORIS,
    METADATA_KEY,
    Kind,
    adapter_kind,
    from_lycoris,
    is_adapter_param,
    kind_config,
    lycoris_modules,
    lycoris_stem,
    peft_config,
    read_adapter_file,
    saved_name,
    settings,
    to_lycoris,
    zero_at_init,
)

Params = dict[str, torch.Tensor]

ADAPTER = "default"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def inject_lora(transformer: Any, cfg: LoraConfig, *, seed: int) -> Params:
    """Add an adapter of ``cfg.kind`` to ``transformer`` in place and return its initial tensors in float32.

    Args:
        transformer: a diffusers model with ``PeftAdapterMixin`` (``add_adapter``).
        cfg: kind, rank, alpha, init and target modules.
        seed: the adapter's random init is a function of this seed alone.

    Returns:
        ``{module parameter name: tensor}`` for every adapter tensor (``lora_A`` / ``lora_B``,
        DoRA's ``lora_magnitude_vector``, ``lokr_*``, ``hada_*``).
    """
    linear = [path for path, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    config = peft_config(cfg, linear)
    with torch.random.fork_rng(devices=[]):  # local seeding; the global RNG is left as it was
        torch.manual_seed(seed)
        try:
            transformer.add_adapter(config, adapter_name=ADAPTER)
        except ValueError as e:
            raise QfluxError(
                f"model.lora.target_modules {list(cfg.target_modules)} do not fit the model: {e}"
            ) from None
    for m in transformer.modules():
        if hasattr(m, "module_dropout"):  # peft's LoKr / LoHa layer: in training mode it draws torch.rand(1)
            m.training = False  # each call (module dropout, 0 here), a host-side branch that breaks compile
    lora: Params = {}
    for name, p in transformer.named_parameters():
        if is_adapter_param(name):
            lora[name] = p.detach().to(torch.float32).clone()
            p.requires_grad_(False)
            if zero_at_init(name):
                p.data.zero_()  # the module alone is now the base model (ΔW = 0)
    if not lora:
        raise QfluxError(f"model.lora.target_modules {list(cfg.target_modules)} matched no layer of the model")
    return lora


def base_adapter(module: Any) -> Params:
    """The module's own adapter tensors (one factor zero after :func:`inject_lora`): substituted with
    ``functional_call`` they give the base model (ΔW = 0) even where the trained tensors are held in the
    module (the autograd engine). Views, not copies; ``{}`` for a module without an adapter."""
    return {name: p.detach() for name, p in module.named_parameters() if is_adapter_param(name)}


def call_with_lora(module: Any, lora: Mapping[str, torch.Tensor], inputs: Mapping[str, Any]) -> Any:
    """``module(**inputs)`` with the LoRA tensors substituted (``{}``: the module as it is, without
    ``functional_call``'s bookkeeping). Pure: the module's own tensors are untouched."""
    if lora:
        return functional_call(module, dict(lora), (), dict(inputs), strict=False)
    return module(**inputs)


def lora_to_diffusers(transformer: Any, lora: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Params:
    """Rename module parameter names to peft's saved names (adapter name dropped), cast to ``dtype``."""
    # deferred: peft (it imports transformers) is a heavy import
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, state_dict=dict(lora), adapter_name=ADAPTER)
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def save_lora(out_dir: str | Path, transformer: Any, lora: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
              pipeline_cls: Any, weight_name: str = LORA_WEIGHT_NAME) -> Path:  # fmt: skip
    """Write ``<out_dir>/<weight_name>`` (pytorch_lora_weights.safetensors) in the diffusers LoRA format
    (LoRA, DoRA) or LyCORIS's with ``transformer.`` module names (LoKr, LoHa).

    Args:
        transformer: the module the adapter was injected into (its peft config goes in the metadata).
        lora: the trained tensors, keyed by module parameter name.
        dtype: precision of the saved tensors.
        pipeline_cls: the diffusers pipeline class whose ``save_lora_weights`` writes the file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = adapter_kind(transformer, ADAPTER)
    if kind in LYCORIS:  # diffusers has no LoKr / LoHa format: LyCORIS names, which ComfyUI reads
        return _save_lycoris(out / weight_name, transformer, lora, dtype, stem=lambda m: f"transformer.{m}")
    pipeline_cls.save_lora_weights(
        out,
        transformer_lora_layers=lora_to_diffusers(transformer, lora, dtype),
        transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER].to_dict(),
        weight_name=weight_name,
    )
    return out / weight_name


def _save_lycoris(path: Path, transformer: Any, lora: Mapping[str, torch.Tensor], dtype: torch.dtype,
                  *, stem: Callable[[str], str]) -> Path:  # fmt: skip
    """A LoKr / LoHa adapter in LyCORIS names, each module under ``stem(module)``
    (:func:`qflux.lora.kinds.to_lycoris`), its settings in the metadata."""

    kind = adapter_kind(transformer, ADAPTER)
    cfg = transformer.peft_config[ADAPTER]
    sd = to_lycoris(lora_to_diffusers(transformer, lora, torch.float32), kind, cfg, stem=stem)
    meta = {"format": "pt", METADATA_KEY: json.dumps({"kind": kind, **settings(cfg)})}
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return path


def read_lora(transformer: Any, path: str | Path, *, naming: Naming, pipeline_cls: Any, what: str) -> dict[str, Delta]:
    """Each adapted module's update ΔW = B·A from a LoRA file in any format qflux writes or reads.

    diffusers / peft, ComfyUI and kohya files are read by qflux's own converter
    (:func:`qflux.lora.formats.split_lora`, the inverse of the ComfyUI export), at any model width; a
    file in none of these spellings goes through the diffusers pipeline's ``lora_state_dict``.

    Args:
        naming: how the model's ComfyUI files name modules ("flux", "qwen").
        pipeline_cls: the diffusers pipeline class (the fallback reader).
        what: how the user gave the path, for messages (``--lora``, ``model.lora.pretrained_weight``).

    Raises:
        QfluxError: missing or unreadable file, a format nobody reads, or modules the model lacks.
    """

    p = Path(path)
    if not p.is_file():
        raise QfluxError(f"{what} '{p}' does not exist; give a .safetensors LoRA file")
    try:
        with safe_open(str(p), "pt") as f:
            metadata = f.metadata()
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a damaged or foreign file
        raise QfluxError(f"{what} '{p}' is not a readable .safetensors file: {e}") from None
    names = layer_names(transformer, naming)
    try:
        swapped = NAMINGS[naming].swapped
        deltas, unknown = split_lora(sd, metadata, names, module_out_features(transformer), swapped)
        if not deltas and not unknown:  # another spelling: diffusers knows more of them
            found = pipeline_cls.lora_state_dict(str(p))
            deltas, unknown = split_lora(
                found[0] if isinstance(found, tuple) else found, None, names, module_out_features(transformer), swapped
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise QfluxError(f"{what} '{p}' is not a LoRA this model reads: {e}") from None
    if unknown:
        raise QfluxError(
            f"{what} '{p}' adapts {len(unknown)} module(s) this model does not have (first: {unknown[0]}): "
            "it was trained for another model"
        )
    if not deltas:
        raise QfluxError(f"{what} '{p}' holds no LoRA tensors (lora_A/lora_B or lora_down/lora_up)")
    return deltas


def load_lora_file(transformer: Any, path: str | Path, *, naming: Naming, pipeline_cls: Any) -> None:
    """Load a LoRA file into ``transformer`` as its active adapter (for predict): any format
    :func:`read_lora` reads, each module at its own rank with its scale folded into B.

    Raises:
        QfluxError: the file is missing or holds no LoRA for this transformer.
    """
    kind, meta, stored = read_adapter_file(path, "--lora")
    if kind != "lora":
        saved = _saved_tensors(transformer, kind, meta, stored, f"--lora '{path}'", naming)
        _attach(transformer, kind, meta, saved, path)
        return
    deltas = read_lora(transformer, path, naming=naming, pipeline_cls=pipeline_cls, what="--lora")
    sd = {}
    for module, (a, b) in deltas.items():
        sd[f"transformer.{module}.lora_A.weight"] = a
        sd[f"transformer.{module}.lora_B.weight"] = b
    try:  # no alphas: diffusers gives every module α = its rank (scale 1), B carries the scale
        transformer.load_lora_adapter(sd, prefix="transformer", adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError) as e:
        raise QfluxError(f"could not load LoRA '{path}' into the transformer: {e}") from None


def _saved_tensors(
    transformer: Any,
    kind: Kind,
    meta: Mapping[str, Any],
    stored: Mapping[str, torch.Tensor],
    what: str,
    naming: Naming,
) -> Params:
    """A DoRA / LoKr / LoHa file's tensors under peft's saved names (``<module>.lora_A.weight``,
    ``<module>.lokr_w1``, ...), float32."""
    if kind == "dora":
        return {k.removeprefix("transformer."): v.float() for k, v in stored.items()}
    linear = [path.removesuffix(".base_layer") for path, m in transformer.named_modules()
              if isinstance(m, torch.nn.Linear) and ".lora_" not in path]  # fmt: skip
    return from_lycoris(stored, {"kind": kind, **meta}, lycoris_modules(linear, naming), what)


def _attach(
    transformer: Any, kind: Kind, meta: Mapping[str, Any], saved: Mapping[str, torch.Tensor], path: Any
) -> None:
    """Give ``transformer`` the adapter a file holds (its kind, rank and alpha, on its modules) and
    load the file's tensors into it (predict)."""
    # deferred: peft (it imports transformers) is a heavy import
    from peft.utils import set_peft_model_state_dict

    modules = sorted({k.split(".lora_")[0] if kind == "dora" else k.rsplit(".", 1)[0] for k in saved})
    alpha = float(meta.get("lora_alpha") or meta["alpha"])  # peft's LoraConfig names it lora_alpha, LoKr / LoHa alpha
    try:
        transformer.add_adapter(kind_config(kind, int(meta["r"]), alpha, modules), adapter_name=ADAPTER)
        result = set_peft_model_state_dict(transformer, dict(saved), adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError) as e:
        raise QfluxError(f"could not load the {kind} file '{path}' into the transformer: {e}") from None
    missing = [k for k in result.missing_keys if is_adapter_param(k)]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        raise QfluxError(f"the {kind} file '{path}' does not fit the transformer (first: {first})")


COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"
EMA_WEIGHT_NAME = "pytorch_lora_weights_ema.safetensors"
"""The moving average of the LoRA (``train.ema_decay``), diffusers format."""
EMA_COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_ema_comfyui.safetensors"
"""Its ComfyUI twin."""


def lora_scale(transformer: Any) -> float:
    """α/r of the injected adapter: ΔW = (α/r)·B·A."""
    cfg = transformer.peft_config[ADAPTER]
    return float(cfg.lora_alpha) / float(cfg.r)


def save_lora_comfyui(out_dir: str | Path, transformer: Any, lora: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                      naming: Naming, file_name: str = COMFYUI_WEIGHT_NAME) -> Path:  # fmt: skip
    """Write ``<out_dir>/<file_name>`` (pytorch_lora_weights_comfyui.safetensors) in ComfyUI's native naming
    (:func:`qflux.lora.formats.to_comfyui`; LoKr and LoHa: LyCORIS tensors under the names ComfyUI
    maps, :func:`qflux.lora.kinds.lycoris_stem`).

    Args:
        naming: "flux" (BFL module names, fused qkv / linear1) or "qwen" (diffusers' names).

    Raises:
        QfluxError: a DoRA adapter (ComfyUI renders DoRA differently: :mod:`qflux.lora.kinds`).
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = adapter_kind(transformer, ADAPTER)
    if kind in LYCORIS:
        return _save_lycoris(out / file_name, transformer, lora, dtype, stem=partial(lycoris_stem, naming=naming))
    if kind == "dora":
        raise QfluxError("a DoRA adapter has no ComfyUI file (ComfyUI divides by ‖W‖ where DoRA divides by ‖W+ΔW‖)")
    sd = to_comfyui(
        lora_to_diffusers(transformer, lora, torch.float32),
        scale=lora_scale(transformer),
        out_features=module_out_features(transformer),
        naming=naming,
    )
    path = out / file_name
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    return path


def lora_from_file(
    transformer: Any, path: str | Path, init: Mapping[str, torch.Tensor], *, naming: Naming, pipeline_cls: Any
) -> Params:
    """The adapter tensors of a LoRA file (any format :func:`read_lora` reads), as our parameters.

    Each module's B is rescaled so that ΔW = (α/r)·B·A of our adapter equals the file's update.
    Modules of our adapter that the file lacks keep their ``init`` tensors (ΔW = 0 at a fresh init).

    Args:
        init: the adapter's fresh tensors (names and shapes to fill).

    Raises:
        QfluxError: missing file, unreadable format, or modules / ranks that do not match the adapter.
    """
    what = "model.lora.pretrained_weight"
    kind = adapter_kind(transformer, ADAPTER)
    if kind != "lora":
        return _kind_from_file(transformer, path, init, kind, naming)
    deltas = read_lora(transformer, path, naming=naming, pipeline_cls=pipeline_cls, what=what)
    ours = lora_scale(transformer)
    out = dict(init)
    outside = []
    for module, (a, b) in deltas.items():
        name_a, name_b = f"{module}.lora_A.{ADAPTER}.weight", f"{module}.lora_B.{ADAPTER}.weight"
        if name_a not in init:
            outside.append(module)
            continue
        if a.shape != init[name_a].shape or b.shape != init[name_b].shape:
            raise QfluxError(
                f"{what} '{path}': {module} has rank {a.shape[0]} (shapes {tuple(a.shape)}, {tuple(b.shape)}), "
                f"the adapter {tuple(init[name_a].shape)}, {tuple(init[name_b].shape)}; set model.lora.r to the "
                "file's rank"
            )
        out[name_a] = a.to(init[name_a].device)
        out[name_b] = (b / ours).to(init[name_b].device)  # (α/r)·B_ours·A = B_file·A
    if outside:
        raise QfluxError(
            f"{what} '{path}' adapts modules outside model.lora.target_modules (first: {outside[0]}); add them "
            "to target_modules"
        )
    return out


def _kind_from_file(
    transformer: Any, path: str | Path, init: Mapping[str, torch.Tensor], kind: Kind, naming: Naming
) -> Params:
    """``init`` with a DoRA / LoKr / LoHa file's tensors, for ``model.lora.pretrained_weight``: the file
    must be of the adapter's kind, rank and alpha, on modules the adapter has.

    Raises:
        QfluxError: another kind, rank or alpha, or tensors the adapter lacks or shapes it does not have.
    """
    what = "model.lora.pretrained_weight"
    file_kind, meta, stored = read_adapter_file(path, what)
    if file_kind != kind:
        raise QfluxError(f"{what} '{path}' is a {file_kind} file; set model.lora.kind: {file_kind} to train on from it")
    cfg = transformer.peft_config[ADAPTER]
    ours = (int(cfg.r), float(getattr(cfg, "lora_alpha", getattr(cfg, "alpha", 0))))
    theirs = (int(meta["r"]), float(meta.get("lora_alpha") or meta["alpha"]))
    if ours != theirs:
        raise QfluxError(f"{what} '{path}' has rank {theirs[0]} and alpha {theirs[1]:g}; set model.lora.r and "
                         f"model.lora.lora_alpha to them (now {ours[0]}, {ours[1]:g})")  # fmt: skip
    saved = _saved_tensors(transformer, kind, meta, stored, f"{what} '{path}'", naming)
    names = {saved_name(n, ADAPTER): n for n in init}
    outside = sorted(set(saved) - set(names))
    if outside:
        raise QfluxError(f"{what} '{path}' adapts modules outside model.lora.target_modules (first: {outside[0]}); "
                         "add them to target_modules")  # fmt: skip
    out = dict(init)
    for key, t in saved.items():
        name = names[key]
        if t.shape != init[name].shape:
            shape = tuple(init[name].shape)
            raise QfluxError(f"{what} '{path}': {key} has shape {tuple(t.shape)}, the adapter {shape}")
        out[name] = t.to(init[name].device)
    return out
