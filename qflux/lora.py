"""LoRA adapters from peft, held outside the module as a dict of tensors.

``inject_lora`` adds a peft adapter to the transformer and returns its initial tensors; the
module's own copies are then zeroed (B = 0), so calling the module *without* the dict is exactly
the base model and calling it through ``functional_call(module, lora, ...)`` applies the adapter:

    y = W·x + (α / r)·B·(A·x)

Saved files are diffusers' format: ``transformer.``-prefixed ``lora_A`` / ``lora_B`` keys with the
peft config in the safetensors metadata, which ``FluxKontextPipeline.load_lora_weights`` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from qflux.config import LoraConfig
from qflux.errors import QfluxError

Params = dict[str, torch.Tensor]

ADAPTER = "default"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def inject_lora(transformer: Any, cfg: LoraConfig, *, seed: int) -> Params:
    """Add a LoRA adapter to ``transformer`` in place and return its initial tensors in float32.

    Args:
        transformer: a diffusers model with ``PeftAdapterMixin`` (``add_adapter``).
        cfg: rank, alpha, init and target modules.
        seed: the adapter's random init is a function of this seed alone.

    Returns:
        ``{module parameter name: tensor}`` for every ``lora_A`` / ``lora_B`` weight.
    """
    import peft

    config = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        init_lora_weights=cfg.init_lora_weights,
        target_modules=list(cfg.target_modules),
    )
    with torch.random.fork_rng(devices=[]):  # local seeding; the global RNG is left as it was
        torch.manual_seed(seed)
        try:
            transformer.add_adapter(config, adapter_name=ADAPTER)
        except ValueError as e:
            raise QfluxError(
                f"model.lora.target_modules {list(cfg.target_modules)} do not fit the model: {e}"
            ) from None
    lora: Params = {}
    for name, p in transformer.named_parameters():
        if ".lora_" in name:
            lora[name] = p.detach().to(torch.float32).clone()
            p.requires_grad_(False)
            if ".lora_B." in name:
                p.data.zero_()  # the module alone is now exactly the base model
    if not lora:
        raise QfluxError(f"model.lora.target_modules {list(cfg.target_modules)} matched no layer of the model")
    return lora


def call_with_lora(module: Any, lora: Mapping[str, torch.Tensor], inputs: Mapping[str, Any]) -> Any:
    """``module(**inputs)`` with the LoRA tensors substituted (``{}``: the module as it is, without
    ``functional_call``'s bookkeeping). Pure: the module's own tensors are untouched."""
    if lora:
        return functional_call(module, dict(lora), (), dict(inputs), strict=False)
    return module(**inputs)


def lora_to_diffusers(transformer: Any, lora: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Params:
    """Rename module parameter names to peft's saved names (adapter name dropped), cast to ``dtype``."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, state_dict=dict(lora), adapter_name=ADAPTER)
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def save_lora(
    out_dir: str | Path,
    transformer: Any,
    lora: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    pipeline_cls: Any,
) -> Path:
    """Write ``<out_dir>/pytorch_lora_weights.safetensors`` in the diffusers LoRA format.

    Args:
        transformer: the module the adapter was injected into (its peft config goes in the metadata).
        lora: the trained tensors, keyed by module parameter name.
        dtype: precision of the saved tensors.
        pipeline_cls: the diffusers pipeline class whose ``save_lora_weights`` writes the file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(
        out,
        transformer_lora_layers=lora_to_diffusers(transformer, lora, dtype),
        transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER].to_dict(),
        weight_name=LORA_WEIGHT_NAME,
    )
    return out / LORA_WEIGHT_NAME


def load_lora_file(transformer: Any, path: str | Path, *, pipeline_cls: Any) -> None:
    """Load a LoRA file into ``transformer`` as its active adapter (for predict).

    Any format the diffusers pipeline's ``lora_state_dict`` understands is accepted.

    Raises:
        QfluxError: the file is missing or holds no LoRA for this transformer.
    """
    p = Path(path)
    if not p.is_file():
        raise QfluxError(f"LoRA file '{p}' does not exist; pass --lora=PATH to a .safetensors file")
    try:
        state_dict, alphas, metadata = pipeline_cls.lora_state_dict(
            str(p), return_alphas=True, return_lora_metadata=True
        )
        pipeline_cls.load_lora_into_transformer(
            state_dict, network_alphas=alphas, transformer=transformer, metadata=metadata
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise QfluxError(f"could not load LoRA '{p}' into the transformer: {e}") from None


COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"


def lora_scale(transformer: Any) -> float:
    """α/r of the injected adapter: ΔW = (α/r)·B·A."""
    cfg = transformer.peft_config[ADAPTER]
    return float(cfg.lora_alpha) / float(cfg.r)


def save_lora_comfyui(
    out_dir: str | Path,
    transformer: Any,
    lora: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    naming: str = "flux",
) -> Path:
    """Write ``<out_dir>/pytorch_lora_weights_comfyui.safetensors`` in ComfyUI's native naming
    (:func:`qflux.lora_formats.flux_to_comfyui`).

    Args:
        naming: "flux" (BFL module names, fused qkv / linear1) or "qwen" (diffusers' names).
    """
    from safetensors.torch import save_file

    from qflux.lora_formats import bfl_target, flux_to_comfyui, module_out_features, same_module

    sd = flux_to_comfyui(
        lora_to_diffusers(transformer, lora, torch.float32),
        scale=lora_scale(transformer),
        out_features=module_out_features(transformer),
        target_of=bfl_target if naming == "flux" else same_module,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / COMFYUI_WEIGHT_NAME
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    return path


def lora_from_file(
    transformer: Any, path: str | Path, init: Mapping[str, torch.Tensor], *, pipeline_cls: Any
) -> Params:
    """The adapter tensors of a LoRA file (diffusers, ComfyUI or kohya format), as our parameters.

    The pipeline's ``lora_state_dict`` converts any format it knows to diffusers keys; each module's
    B is rescaled so that ΔW = (α/r)·B·A of our adapter equals the file's update. Modules of our
    adapter that the file lacks keep their ``init`` tensors (ΔW = 0 at a fresh init).

    Args:
        init: the adapter's fresh tensors (names and shapes to fill).

    Raises:
        QfluxError: missing file, unreadable format, or modules / ranks that do not match the adapter.
    """
    p = Path(path)
    if not p.is_file():
        raise QfluxError(f"model.lora.pretrained_weight '{p}' does not exist; give a .safetensors LoRA file or null")
    try:
        sd, alphas, metadata = pipeline_cls.lora_state_dict(str(p), return_alphas=True, return_lora_metadata=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise QfluxError(f"model.lora.pretrained_weight '{p}' is not a LoRA this model reads: {e}") from None
    file_scale = 1.0  # kohya / ComfyUI files come back with α/r folded into the weights
    meta = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}
    if "lora_alpha" in meta and "r" in meta:  # diffusers files carry the peft config
        file_scale = float(meta["lora_alpha"]) / float(meta["r"])
    ours = lora_scale(transformer)
    out = dict(init)
    unknown = []
    for key, a in sd.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("transformer.").rsplit(".lora_A.", 1)[0]
        name_a, name_b = f"{module}.lora_A.{ADAPTER}.weight", f"{module}.lora_B.{ADAPTER}.weight"
        b = sd[key.replace(".lora_A.", ".lora_B.")]
        scale = file_scale
        if alphas and f"{key.rsplit('.lora_A.', 1)[0]}.alpha" in alphas:
            scale = float(alphas[f"{key.rsplit('.lora_A.', 1)[0]}.alpha"]) / a.shape[0]
        used = (b != 0).any(0)  # a part of a fused layer: only its own columns of up are non-zero
        if not used.any():
            continue  # ΔW = 0 (e.g. proj_mlp of a fused linear1 that had no LoRA of its own)
        if name_a not in init:
            unknown.append(module)
            continue
        if a.shape[0] > init[name_a].shape[0] and int(used.sum()) == init[name_a].shape[0]:
            a, b = a[used], b[:, used]
        if a.shape != init[name_a].shape or b.shape != init[name_b].shape:
            raise QfluxError(
                f"model.lora.pretrained_weight '{p}': {module} has rank {a.shape[0]} (shapes {tuple(a.shape)}, "
                f"{tuple(b.shape)}), the adapter {tuple(init[name_a].shape)}, {tuple(init[name_b].shape)}; "
                "set model.lora.r to the file's rank"
            )
        out[name_a] = a.to(torch.float32).to(init[name_a].device)
        out[name_b] = (b.to(torch.float32) * (scale / ours)).to(init[name_b].device)
    if unknown:
        raise QfluxError(
            f"model.lora.pretrained_weight '{p}' adapts modules outside model.lora.target_modules "
            f"(first: {unknown[0]}); add them to target_modules"
        )
    return out
