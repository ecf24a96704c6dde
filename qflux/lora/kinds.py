"""The adapter kinds beside plain LoRA, all through peft: DoRA, LoKr and LoHa, and their files.

    lora   ΔW = s·B·A                                  (s = α/r; peft ``LoraConfig``)
    dora   W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row       (m: a learned magnitude per output row; ``use_dora``)
    lokr   ΔW = s·(W1 ⊗ W2)                            (Kronecker; W2 = W2a·W2b where r < half its size; ``LoKrConfig``)
    loha   ΔW = s·(W1a·W1b) ⊙ (W2a·W2b)                (Hadamard of two rank-r products; ``LoHaConfig``)

Files. lora and dora are diffusers' format (``transformer.<module>.lora_A.weight``, DoRA's
``.lora_magnitude_vector``, the peft config in the metadata), which ``load_lora_weights`` reads.
lokr and loha are written in the LyCORIS names ComfyUI reads (``comfy/lora.py`` ``load_lora``,
``comfy/weight_adapter/lokr.py`` and ``loha.py``): ``<module>.lokr_w1``, ``.lokr_w2``,
``.lokr_w1_a`` ... / ``.hada_w1_a`` ... and ``<module>.alpha``, with the module spelled
``transformer.<diffusers path>`` in pytorch_lora_weights.safetensors and, in the ComfyUI file, under
the name ComfyUI's ``model_lora_keys_unet`` maps for every model: ``diffusion_model.<ComfyUI
module>`` for a whole layer, SimpleTuner's ``lycoris_<path with _>`` for a part of a fused one
(:func:`qflux.lora.kinds.lycoris_stem`). ComfyUI knows no FLUX.2 diffusers name for the time
embedder and the shared modulations, so the ``transformer.`` file loses those there (the end
block says so). ComfyUI scales a module by
alpha / rank, the rank read from ``hada_w1_b`` (LoHa) or a low-rank ``lokr_w*_b`` (LoKr), and by 1
for a LoKr of two full factors: such a module's s is folded into ``lokr_w1`` and no alpha is
written. The metadata's ``qflux_adapter`` (kind, r, alpha and LoKr's factorisation) lets qflux
rebuild the adapter to read the file back.

ComfyUI's DoRA (``weight_decompose``) divides by ‖W‖ where peft divides by ‖W + ΔW‖, so it would
render a DoRA file differently: DoRA has no ComfyUI file.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from qflux.config.errors import QfluxError
from qflux.config.schema import LoraConfig
from qflux.lora.formats import BLOCK_PATH, NAMINGS, Naming, comfy_target

Kind = Literal["lora", "dora", "lokr", "loha"]
LYCORIS: tuple[Kind, ...] = ("lokr", "loha")
"""The kinds saved in LyCORIS names (diffusers cannot load them)."""
_PARAM = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector|hada_w[12]_[ab]|lokr_w[12](_[ab])?|lokr_t2)\.")
_SAVED = re.compile(r"^(.+)\.(lora_magnitude_vector|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)$")
METADATA_KEY = "qflux_adapter"


ALL_LINEAR = "all-linear"
"""``model.lora.target_modules: [all-linear]``: every linear layer of the transformer."""


def every_linear(cfg: LoraConfig) -> bool:
    """Whether ``cfg`` targets every linear layer (``target_modules: [all-linear]``)."""
    return tuple(cfg.target_modules) == (ALL_LINEAR,)


def peft_config(cfg: LoraConfig, linear: Sequence[str] = ()) -> Any:
    """The peft config of ``cfg.kind`` (rank, alpha, init, target modules; ``[all-linear]`` becomes
    ``linear``, the model's linear layer paths)."""
    targets = list(linear) if every_linear(cfg) else list(cfg.target_modules)
    return kind_config(cfg.kind, cfg.r, cfg.lora_alpha, targets, cfg.init_lora_weights)


def kind_config(kind: Kind, r: int, alpha: float, targets: list[str], init: bool | str = True) -> Any:
    """peft's config of an adapter of ``kind``: ``LoraConfig`` (``use_dora`` for dora), ``LoKrConfig``
    or ``LoHaConfig``; ``init`` is peft's LoRA init, true or false for LoKr / LoHa ('gaussian': true)."""
    # deferred: peft (it imports transformers) is a heavy import
    import peft

    if kind in ("lora", "dora"):
        return peft.LoraConfig(
            r=r, lora_alpha=alpha, init_lora_weights=init, target_modules=targets, use_dora=kind == "dora"
        )
    kind_cls = peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig
    return kind_cls(r=r, alpha=alpha, init_weights=bool(init), target_modules=targets)


def adapter_kind(transformer: Any, adapter: str = "default") -> Kind:
    """The kind of ``transformer``'s adapter ``adapter``, from its peft config."""
    cfg = transformer.peft_config[adapter]
    name = type(cfg).__name__
    if name == "LoKrConfig":
        return "lokr"
    if name == "LoHaConfig":
        return "loha"
    return "dora" if getattr(cfg, "use_dora", False) else "lora"


def is_adapter_param(name: str) -> bool:
    """Whether a module parameter name is an adapter tensor (of any kind)."""
    return _PARAM.search(name) is not None


def zero_at_init(name: str) -> bool:
    """The factor whose module copy is zeroed after injection, so the module alone is the base model
    (ΔW = 0 with it zero): B of lora and dora, W2b of loha, W1 (or W1a) of lokr — the factor peft
    itself zeroes at its default init."""
    return any(f".{p}." in name for p in ("lora_B", "hada_w2_b", "lokr_w1", "lokr_w1_a"))


def module_of(name: str) -> str:
    """The module path of an adapter parameter (``a.b.to_q.lora_A.default.weight`` → ``a.b.to_q``)."""
    m = _PARAM.search(name)
    if m is None:
        raise ValueError(f"'{name}' is not an adapter parameter")
    return name[: m.start()]


def saved_name(name: str, adapter: str = "default") -> str:
    """The name peft saves a module parameter under (adapter name dropped; DoRA's magnitude bare)."""
    out = name.replace(f".{adapter}.", ".").removesuffix(f".{adapter}")
    return out.removesuffix(".weight") if out.endswith(".lora_magnitude_vector.weight") else out


def settings(cfg: Any) -> dict[str, Any]:
    """What the file's metadata records of a LoKr / LoHa peft config, to rebuild it."""
    out = {"r": int(cfg.r), "alpha": float(cfg.alpha)}
    if type(cfg).__name__ == "LoKrConfig":
        out |= {"decompose_both": bool(cfg.decompose_both), "decompose_factor": int(cfg.decompose_factor)}
    return out


def to_lycoris(
    saved: Mapping[str, torch.Tensor], kind: Kind, cfg: Any, *, stem: Callable[[str], str]
) -> dict[str, torch.Tensor]:
    """peft's saved LoKr / LoHa tensors (``<module>.lokr_w1`` ...) in LyCORIS names with ``.alpha``
    (see the module docstring), each module under ``stem(module)``: ``transformer.<module>`` in the
    diffusers-named file, :func:`qflux.lora.kinds.lycoris_stem` in the ComfyUI file."""
    scale = float(cfg.alpha) / float(cfg.r)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in saved.items():
        m = _SAVED.match(key)
        if m is None:
            raise ValueError(f"'{key}' is not a {kind} tensor")
        modules.setdefault(m.group(1), {})[m.group(2)] = t
    out: dict[str, torch.Tensor] = {}
    for module, parts in modules.items():
        name = stem(module)
        full = kind == "lokr" and "lokr_w1_a" not in parts and "lokr_w2_a" not in parts
        for leaf, t in parts.items():
            out[f"{name}.{leaf}"] = t * scale if full and leaf == "lokr_w1" else t
        if not full:  # ComfyUI: alpha / rank, the rank read from the low-rank factor (= r)
            out[f"{name}.alpha"] = torch.tensor(float(cfg.alpha))
    return out


def from_lycoris(
    sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any], modules: Mapping[str, str], what: str
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_lycoris`: peft's saved names (``<module>.lokr_w1`` ...), the folded
    scale taken back out of a full LoKr's ``lokr_w1``.

    Args:
        meta: the file's ``qflux_adapter`` metadata (kind, r, alpha).
        modules: ``{name a file may give a module: module path}``
            (:func:`qflux.lora.kinds.lycoris_modules`).

    Raises:
        QfluxError: a module the model lacks.
    """
    scale = float(meta["alpha"]) / float(meta["r"])
    out: dict[str, torch.Tensor] = {}
    stems = {key.rsplit(".", 1)[0] for key in sd}
    for stem in stems:
        module = modules.get(stem)
        if module is None:
            raise QfluxError(f"{what} adapts '{stem}', which this model does not have: it was trained for another "
                             "model")  # fmt: skip
        parts = {key.rsplit(".", 1)[1]: t for key, t in sd.items() if key.rsplit(".", 1)[0] == stem}
        full = meta["kind"] == "lokr" and "alpha" not in parts
        for name, t in parts.items():
            if name != "alpha":
                out[f"{module}.{name}"] = (t.float() / scale) if full and name == "lokr_w1" else t.float()
    return out


def read_adapter_file(path: str | Path, what: str) -> tuple[Kind, dict[str, Any], dict[str, torch.Tensor]]:
    """The kind, settings and tensors of a file qflux wrote for any kind.

    Returns:
        (kind, settings, tensors as stored): DoRA's settings are the peft config diffusers writes
        (``lora_adapter_metadata``), LoKr's / LoHa's the ``qflux_adapter`` metadata; "lora" for a
        file with neither DoRA's nor LyCORIS tensors (read by :func:`qflux.lora.adapter.read_lora`).

    Raises:
        QfluxError: a missing or unreadable file, or a LoKr / LoHa file without qflux's metadata.
    """

    p = Path(path)
    if not p.is_file():
        raise QfluxError(f"{what} '{p}' does not exist; give a .safetensors LoRA file")
    try:
        with safe_open(str(p), "pt") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a damaged or foreign file
        raise QfluxError(f"{what} '{p}' is not a readable .safetensors file: {e}") from None
    if any(".hada_" in k or ".lokr_" in k for k in sd):
        if METADATA_KEY not in metadata:
            raise QfluxError(
                f"{what} '{p}' is a LoKr / LoHa file without qflux's '{METADATA_KEY}' metadata; qflux reads the "
                "LyCORIS files it wrote (ComfyUI reads this one)"
            )
        meta = json.loads(metadata[METADATA_KEY])
        return meta["kind"], meta, sd
    if any(k.endswith(".lora_magnitude_vector") for k in sd):
        raw = json.loads(metadata.get("lora_adapter_metadata") or "{}")
        config = {k.removeprefix("transformer."): v for k, v in raw.items()}
        return "dora", config, sd
    return "lora", {}, sd


def lycoris_stem(module: str, naming: Naming) -> str:
    """The ComfyUI file's name of a diffusers module's LyCORIS tensors (LoKr, LoHa).

    A module that is a whole ComfyUI layer goes under that layer's own name, ``diffusion_model.<name>``,
    which ComfyUI's ``model_lora_keys_unet`` maps for every model (its generic key). A part of a fused
    layer (FLUX double-block q/k/v, FLUX.1's ``linear1``), or a layer whose output halves ComfyUI swaps
    (``final_layer.adaLN_modulation.1``), goes under SimpleTuner's ``lycoris_<path with _>``, which its
    Flux key map (``comfy/utils.py`` ``flux_to_diffusers``) places with the part's row offset (and the
    swap): a Kronecker or Hadamard product cannot be stacked into a fused layer as LoRA factors can.

    Raises:
        ValueError: a module with no ComfyUI name under ``naming``.
    """
    target, _, parts = comfy_target(module, naming)
    if parts == 1 and target not in NAMINGS[naming].swapped:
        return f"diffusion_model.{target}"
    return f"lycoris_{module.replace('.', '_')}"


def lycoris_modules(modules: Iterable[str], naming: Naming) -> dict[str, str]:
    """Every name a LyCORIS file may give one of ``modules`` → that module: ``transformer.<path>``,
    ``lycoris_<path with _>`` and the ComfyUI name :func:`lycoris_stem` writes (the inverse of both files)."""
    out: dict[str, str] = {}
    for m in modules:
        out[f"transformer.{m}"] = m
        out[f"lycoris_{m.replace('.', '_')}"] = m
        with contextlib.suppress(ValueError):  # no ComfyUI name: only the other two spellings
            out[lycoris_stem(m, naming)] = m
    return out


def comfy_drops(modules: Iterable[str], naming: Naming) -> list[str]:
    """The adapted modules that ComfyUI would not load from a file keyed by diffusers names
    (``transformer.<module>``: the diffusers file and a LyCORIS ``transformer.`` file); they load from
    the ComfyUI file (:func:`lycoris_stem`, :func:`to_comfyui`)."""
    known = NAMINGS[naming].known_top
    if known is None:
        return []
    return [m for m in modules if BLOCK_PATH.match(m) is None and m not in known]
