"""``python -m qflux.lora VERB``: the LoRA toolbox (a stable command; scripts may call it).

    inspect FILE [--family=F --model=M]        spelling, layers, ranks, targets, each layer's ‖ΔW‖_F; which layers
                                               qflux, ComfyUI and diffusers apply to the model, which they drop
    resize FILE --rank=R --out=PATH            the best rank-R approximation of every layer (SVD), energy kept
    extract --base=A --tuned=B --rank=R --out=PATH
                                               a LoRA of the 2-D weights that differ between two transformers
    ema CHECKPOINT_DIR... --decay=D --out=PATH  the post-hoc moving average of a run's checkpoints
    convert FILE --to=diffusers|comfyui --family=F --model=M --out=PATH
                                               diffusers or ComfyUI names, for the model M (a diffusers folder,
                                               or a hub id whose shapes qflux ships) of family F
    merge FILE --into=FOLDER --family=F --out=PATH [--dtype=bfloat16|float16|float32|fp8] [--names=diffusers|original]
                                               the transformer with the LoRA baked in, one safetensors file
                                               (original: BFL's names, as ComfyUI's checkpoints hold them)

Every verb that writes takes ``--out``, writes safetensors with metadata saying what made it, and never writes
over an input. Errors print one line and exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import fire
import torch

from qflux.config.errors import QfluxError
from qflux.lora.model_verbs import convert_file, loader_lines, merge_file
from qflux.lora.toolbox import ema_file, extract_file, inspect_lines, resize_file


def inspect(file: str, family: str | None = None, model: str | None = None) -> None:
    """Print a LoRA file's spelling, layers, ranks and targets, and each layer's ‖ΔW‖_F; with ``--family`` and
    ``--model``, which layers qflux, ComfyUI and diffusers apply to that model and which they drop."""
    for line in inspect_lines(file):
        print(line)
    if (family is None) != (model is None):
        raise QfluxError("inspect's loader report takes both --family and --model (a diffusers folder or hub id)")
    if family is not None and model is not None:
        print(f"on {model}:")
        for line in loader_lines(file, *model_on_meta(family, model)):
            print("  " + line)


def resize(file: str, rank: int, out: str) -> None:
    """Write ``file`` at rank ``rank`` (every layer's best approximation) to ``out``; print the energy kept."""
    path, kept = resize_file(file, int(rank), out)
    worst = min(kept, key=kept.__getitem__)
    print(f"wrote {path}: rank {rank}, energy kept {min(kept.values()):.4%} (least: {worst}) to "
          f"{max(kept.values()):.4%} per layer")  # fmt: skip


def extract(base: str, tuned: str, rank: int, out: str) -> None:
    """Write a rank-``rank`` LoRA of what differs between two transformers (safetensors files or folders)."""
    path, kept = extract_file(base, tuned, int(rank), out)
    print(f"wrote {path}: {len(kept)} layers at rank {rank}, energy kept {min(kept.values()):.4%} at least")


def ema(*checkpoints: str, decay: float, out: str) -> None:
    """Write the post-hoc moving average (decay ``decay`` per step) of the checkpoints' LoRA files."""
    if not checkpoints:
        raise QfluxError("ema takes the checkpoint-<step> folders to average, then --decay and --out")
    path = ema_file(checkpoints, float(decay), out)
    print(f"wrote {path}: the moving average of {len(checkpoints)} checkpoints, decay {decay}")


def convert(file: str, to: str, family: str, model: str, out: str) -> None:
    """Write ``file`` in diffusers or ComfyUI names for ``model`` (family ``family``: its ComfyUI names)."""
    transformer, naming = model_on_meta(family, model)
    path = convert_file(file, to, transformer, naming, out)  # type: ignore[arg-type]
    print(f"wrote {path}: {to} names for {model}")


def model_on_meta(family: str, model: str) -> tuple[Any, str]:
    """The transformer of ``model`` (a diffusers folder or its transformer folder, or a hub id whose shapes qflux
    ships) built on the meta device (names and widths, no memory), and the ComfyUI naming of ``family``."""
    # deferred: the families (and diffusers) are heavy imports, and only convert names a model
    import diffusers

    from qflux.models import FAMILIES
    from qflux.weights.shapes import published

    if family not in FAMILIES:
        raise QfluxError(f"--family takes one of {', '.join(FAMILIES)}; got {family!r}")
    folder = Path(model)
    found = [f / "config.json" for f in (folder / "transformer", folder) if (f / "config.json").is_file()]
    shipped = published(model)
    if found:
        config = json.loads(found[0].read_text(encoding="utf-8"))
    elif shipped is not None and "transformer" in shipped:
        config = shipped["transformer"]
    else:
        raise QfluxError(f"--model '{model}' is neither a diffusers folder (transformer/config.json) nor a hub id "
                         "whose shapes qflux ships")  # fmt: skip
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None:
        raise QfluxError(f"--model '{model}': its transformer config names no diffusers class it knows")
    with torch.device("meta"):
        transformer = cls.from_config(config)
    return transformer, FAMILIES[family].naming


def merge(file: str, into: str, family: str, out: str, dtype: str = "bfloat16", names: str = "diffusers") -> None:
    """Bake ``file`` into the transformer of the diffusers folder ``into`` (family ``family``) as one safetensors
    file in ``dtype`` (bfloat16, float16, float32, or fp8: ComfyUI's fp8-scaled layout), in diffusers or the original
    (BFL: ComfyUI's) ``names``."""
    if names not in ("diffusers", "original"):
        raise QfluxError(f"--names takes diffusers or original; got {names!r}")
    dtypes = {
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float32": torch.float32,
        "fp8": torch.float8_e4m3fn,
    }
    if dtype not in dtypes:
        raise QfluxError(f"--dtype takes one of {', '.join(dtypes)}; got {dtype!r}")
    if not Path(into).is_dir():
        raise QfluxError(f"--into '{into}' is not a folder; give the diffusers model folder (or its transformer/)")
    path, layers = merge_file(file, into, *model_on_meta(family, into), out, dtypes[dtype], names == "original")
    print(f"wrote {path}: {layers} layers merged, {dtype}; load it with <Transformer>.from_single_file('{path}', "
          f"config='{into}', subfolder='transformer')")  # fmt: skip


VERBS = {"inspect": inspect, "resize": resize, "extract": extract, "ema": ema, "convert": convert, "merge": merge}


def main(argv: list[str] | None = None) -> None:
    """Run one verb; a :class:`QfluxError` prints ``error: ...`` and exits 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in VERBS:
        print(__doc__, file=sys.stderr if args else sys.stdout)
        raise SystemExit(2 if args else 0)
    try:
        fire.Fire(VERBS, command=args, name="qflux.lora")
    except QfluxError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
