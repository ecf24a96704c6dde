"""Loading frozen components from a diffusers-layout folder, one at a time or a job's set as the
model's record (shared by every model).

A loader takes a local folder or hub id, a dtype and a device, and returns the component in eval
mode with ``requires_grad`` off; failures are one sentence naming the folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import attrs
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qflux.config.errors import QfluxError
from qflux.weights.folders import resolve_model_dir
from qflux.weights.quantize import FP8, load_prequantized, prequantized_kind, quantize_frozen, share_code_tables


def component_folder(model_path: str | Path, subfolder: str, *, pipeline: str) -> Path:
    """The model folder, checked to hold ``subfolder`` (``pipeline`` names the model in errors)."""
    return resolve_model_dir(str(model_path), [subfolder], pipeline=pipeline)


def component_config(model_dir: str | Path, subfolder: str) -> dict[str, Any]:
    """A component's ``config.json`` (read without loading the component: sizes, factors)."""

    path = Path(model_dir) / subfolder / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QfluxError(f"could not read '{path}': {e}") from None
    return config


def frozen(module: Any, device: str | torch.device) -> Any:
    """``module`` without gradients, in eval mode, on ``device`` (4-bit layers sharing their
    constant code tables: :func:`qflux.weights.quantize.share_code_tables`)."""

    module.requires_grad_(False)
    module.eval()
    module = module.to(device)
    share_code_tables(module)
    return module


def load_component(
    cls: Any,
    model_path: str | Path,
    subfolder: str,
    weight_dtype: torch.dtype,
    device: str | torch.device,
    *,
    pipeline: str,
    quantize: str = "none",
    file: str | Path | None = None,
) -> Any:
    """``cls.from_pretrained(folder, subfolder=..., dtype=...)``, frozen on ``device``.

    Args:
        file: a single safetensors file of the component's weights (:func:`single_file`), the folder giving its
            config.
        quantize: store the frozen linears as none / fp8 / nf4 / fp4 (:mod:`qflux.weights.quantize`); done
            on the CPU before the move, so the device never holds the full-precision weights. A
            pre-quantized checkpoint (bitsandbytes 4-bit, or fp8 with scales) loads as it is stored.
    """

    path = component_folder(model_path, subfolder, pipeline=pipeline)
    folder = path / subfolder
    if file is not None:
        module = single_file(cls, Path(file), path, subfolder, weight_dtype)
        quantize_frozen(module, quantize, compute_dtype=weight_dtype)
        return frozen(module, device)
    try:
        kind = prequantized_kind(folder)
        if kind is not None and not hasattr(cls, "load_config"):
            raise QfluxError(
                f"'{folder}' holds a pre-quantized ({kind}) {subfolder}; qflux reads those for diffusers models "
                "only. Point the model folder at a bf16 checkpoint and set model.quantize_text_encoders: true"
            )
        if kind is not None:
            module = load_prequantized(cls, folder, weight_dtype, kind)
        else:
            module = cls.from_pretrained(path, subfolder=subfolder, dtype=weight_dtype)
            module.requires_grad_(False)
            quantize_frozen(module, quantize, compute_dtype=weight_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise QfluxError(f"could not load {subfolder} from '{folder}': {e}") from None
    return frozen(module, device)


def single_file(cls: Any, file: Path, path: Path, subfolder: str, weight_dtype: torch.dtype) -> Any:
    """``cls.from_single_file(file, config=path, subfolder=subfolder)`` in ``weight_dtype``, frozen: the weights of a
    single safetensors file (diffusers names, or the original ones diffusers converts; fp8 kept in fp8) or GGUF file
    (kept quantized: :func:`_gguf_config`), the config of the folder.

    Raises:
        QfluxError: a missing file, a diffusers-named file whose tensors do not match the config (the first
            mismatched tensor named), or one diffusers cannot read.
    """
    if not file.is_file():
        raise QfluxError(f"model.transformer_file '{file}' does not exist; give a .safetensors file of the {subfolder}")
    single = partial(cls.from_single_file, str(file), config=str(path), subfolder=subfolder, dtype=weight_dtype)
    if file.suffix.lower() == ".gguf":
        load = partial(single, quantization_config=_gguf_config(file, weight_dtype))
    elif _holds_fp8(file):  # fp8 e4m3fn (ComfyUI's, or fp8-scaled): kept in fp8, never upcast
        load = partial(_fp8, cls, file, path / subfolder, weight_dtype, _check_shapes(cls, file, path / subfolder))
    else:
        _check_shapes(cls, file, path / subfolder)
        load = single
    try:
        module = load()
    except (OSError, ValueError, KeyError, IndexError, RuntimeError) as e:  # diffusers' converters
        raise QfluxError(
            f"could not load model.transformer_file '{file}' as the {subfolder} of '{path}': {e}"
        ) from None
    module.requires_grad_(False)
    return module


def _gguf_config(file: Path, weight_dtype: torch.dtype) -> Any:
    """diffusers' GGUF quantizer: each quantized linear stays quantized (Q8_0, Q4_K, ...) and is dequantized to
    ``weight_dtype`` in its forward, as diffusers runs it.

    Raises:
        QfluxError: the ``gguf`` package is missing.
    """
    try:
        import gguf  # noqa: F401  (diffusers reads the file with it)
    except ImportError:
        raise QfluxError(
            f"model.transformer_file '{file}' is GGUF: pip install 'qflux[gguf]' (the gguf package)"
        ) from None
    # deferred: diffusers is a heavy import
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=weight_dtype)


SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                     "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip
"""Bytes per element of each safetensors dtype."""


def stored_bytes(file: str | Path) -> tuple[int, str]:
    """(bytes of every tensor as the file stores them, what they are stored as: the dtypes or GGUF types, the most
    bytes first), read from the header (safetensors) or the tensor table (GGUF) alone."""
    path = Path(file)
    by_kind: dict[str, int] = {}
    if path.suffix.lower() == ".gguf":
        # deferred: the gguf package is an extra
        from gguf import GGUFReader

        for t in GGUFReader(str(path)).tensors:
            by_kind[t.tensor_type.name] = by_kind.get(t.tensor_type.name, 0) + int(t.n_bytes)
    else:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                sl = f.get_slice(k)
                n = math.prod(sl.get_shape()) * SAFETENSORS_BYTES.get(sl.get_dtype(), 4)
                by_kind[sl.get_dtype()] = by_kind.get(sl.get_dtype(), 0) + n
    kinds = sorted(by_kind, key=by_kind.__getitem__, reverse=True)
    return sum(by_kind.values()), ", ".join(kinds)


def _fp8(cls: Any, file: Path, folder: Path, weight_dtype: torch.dtype, own_names: bool) -> Any:
    """An fp8 file's model with its linear layers kept in fp8 (:func:`load_prequantized`): in the model's own names
    as it is, in the original ones through diffusers' converter (:func:`_converted_fp8`)."""
    sd = None if own_names else _converted_fp8(cls, file, folder)
    return load_prequantized(cls, folder, weight_dtype, "fp8", files=[file], state_dict=sd)


def _converted_fp8(cls: Any, file: Path, folder: Path) -> dict[str, torch.Tensor]:
    """An fp8 file in the original names, through diffusers' own converter for ``cls`` with its fp8 tensors as they
    are (the converter only renames, stacks, splits and swaps rows): the diffusers-named state dict, each fp8 weight
    with the scale of the original weight its rows came from (``<module>.scale_weight``).

    Which original tensor a converted one came from is read by converting a second checkpoint of markers: each
    tensor replaced by its index, one value per row, which the converter moves as it moves the rows.
    """
    # deferred: diffusers is a heavy import
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    convert = SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"]
    config = dict(cls.load_config(folder))
    raw = load_file(str(file))
    scales = {}
    for key in [k for k in raw if k.endswith(SCALES)]:
        t = raw.pop(key)
        if key != "scaled_fp8":  # the marker of ComfyUI's fp8-scaled files
            scales[key.rsplit(".", 1)[0]] = t
    names = list(raw)
    markers = {k: torch.full((v.shape[0],), float(i)) if v.ndim else v.float() for i, (k, v) in enumerate(raw.items())}
    converted = convert(checkpoint=raw, config=config)
    sources = convert(checkpoint=markers, config=config)
    for key, t in list(converted.items()):
        if t.dtype != FP8 or not key.endswith(".weight"):
            continue
        source = names[int(sources[key].reshape(-1)[0])].removesuffix(".weight")
        converted[key.removesuffix(".weight") + ".scale_weight"] = scales.get(source, torch.ones(1))
    return converted


def _holds_fp8(file: Path) -> bool:
    """Whether a safetensors file stores float8_e4m3fn tensors (read from its header)."""
    with safe_open(str(file), "pt") as f:
        return any(f.get_slice(k).get_dtype() == "F8_E4M3" for k in f.keys())  # noqa: SIM118


def _check_shapes(cls: Any, file: Path, folder: Path) -> bool:
    """Whether a file is in the model's own (diffusers) names, refusing one whose tensors the folder's config does
    not make (naming the first); a file in other names is left to diffusers' converter. fp8 files' scales
    (``<layer>.scale_weight`` / ``.weight_scale``, ``scaled_fp8``) are not the model's tensors."""
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(file), "pt") as f:
        keys = [k for k in f.keys() if not k.endswith(SCALES)]  # noqa: SIM118
        if not keys or not set(keys) <= set(want):  # not diffusers names: diffusers converts them
            return False
        for k in keys:
            got = tuple(f.get_slice(k).get_shape())
            if got != want[k]:
                raise QfluxError(
                    f"model.transformer_file '{file}': {k} is {list(got)}, the config at '{folder}' makes it "
                    f"{list(want[k])}; the file is of another model (or size) than the folder"
                )
    missing = sorted(set(want) - set(keys))
    if missing:
        raise QfluxError(f"model.transformer_file '{file}' lacks {len(missing)} tensor(s) the config at '{folder}' "
                         f"makes (first: {missing[0]})")  # fmt: skip
    return True


SCALES = (".scale_weight", ".weight_scale", "scaled_fp8")
"""The names of an fp8 file's scales (ComfyUI's fp8-scaled files and qflux's own)."""


Table = Mapping[str, Any]
"""A model's loaders: {component (its subfolder): a class with ``from_pretrained``, or a function
``folder → component``}. Classes that are ``torch.nn.Module`` load as frozen weights."""


@attrs.frozen(eq=False)
class Components:
    """The frozen components every diffusers edit pipeline has; ``None`` for a weight component a job
    does not load. A model's record adds its own (:attr:`ModelFiles.record`)."""

    transformer: Any
    """The diffusion transformer; in training it carries an injected (zeroed) LoRA adapter."""
    vae: Any
    """The autoencoder, or None when the job reads latents from the cache."""
    text_encoder: Any
    """The (first) text encoder, or None when the job reads prompt embeddings from the cache."""
    tokenizer: Any
    """The text encoder's tokenizer."""
    scheduler: Any
    """``FlowMatchEulerDiscreteScheduler``, whose config predict and training read."""


M = TypeVar("M", bound=Components)


@attrs.frozen(eq=False)
class ModelFiles(Generic[M]):
    """A model's diffusers folder: its name in messages, how each component loads and the record
    that holds a job's components."""

    pipeline: str
    """The model's name in messages (``"FLUX.1 Kontext"``)."""
    table: Callable[[], Table]
    """{component: how it loads} (a function, so the classes import only when used)."""
    record: Callable[..., M]
    """{component: loaded or None} as keywords → the model's record of them (a :class:`Components`)."""

    def load(
        self,
        model_path: str | Path,
        weight_dtype: torch.dtype,
        *,
        include: Sequence[str] | None = None,
        devices: Mapping[str, str | torch.device] | None = None,
        quantize: Mapping[str, str] | None = None,
        files: Mapping[str, str | Path] | None = None,
    ) -> M:
        """The components a job needs, as the model's record: the weights named in ``include``
        (default all; the others None) placed on ``devices[name]`` (default cpu) and quantized as
        ``quantize[name]`` (default none), a weight component from the single file ``files[name]`` where given
        (:func:`load_component`), and every tokenizer, processor and scheduler (they are small).

        Raises:
            QfluxError: the folder lacks a component or one does not load (:func:`load_part`).
        """
        table = self.table()
        weights = [n for n, how in table.items() if _is_weights(how)] if include is None else list(include)
        light = [name for name, how in table.items() if not _is_weights(how)]
        path = resolve_model_dir(str(model_path), [*weights, *light], pipeline=self.pipeline)
        place, plan = devices or {}, quantize or {}
        out: dict[str, Any] = {name: None for name in table}
        for name in [*weights, *light]:
            out[name] = load_part(self, path, name, weight_dtype, place.get(name, "cpu"),
                                  quantize=plan.get(name, "none"), file=(files or {}).get(name))  # fmt: skip
        return self.record(**out)


def _is_weights(how: Any) -> bool:
    """Whether a table entry is a module with weights (the others are tokenizers, processors, schedulers)."""
    return isinstance(how, type) and issubclass(how, torch.nn.Module)


def load_part(
    files: ModelFiles[Any],
    model_path: str | Path,
    name: str,
    weight_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    *,
    quantize: str = "none",
    file: str | Path | None = None,
) -> Any:
    """Component ``name`` of a model folder: weights frozen in ``weight_dtype`` on ``device``
    (:func:`load_component`, from the single ``file`` when given), or a tokenizer, processor or scheduler.

    Raises:
        QfluxError: the folder lacks the component or it does not load (one sentence naming it).
    """
    how: Any = files.table()[name]
    if _is_weights(how):
        return load_component(how, model_path, name, weight_dtype, device, pipeline=files.pipeline, quantize=quantize,
                              file=file)  # fmt: skip
    folder = component_folder(model_path, name, pipeline=files.pipeline) / name
    try:
        load = getattr(how, "from_pretrained", how)  # a class's constructor from a folder, or a function
        return load(folder)
    except (OSError, ValueError, KeyError) as e:
        raise QfluxError(f"could not load {name} from '{folder}': {e}") from None
