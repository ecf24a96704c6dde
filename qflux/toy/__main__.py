"""``python -m qflux.toy VERB``: the toy world's files.

- ``scenes OUT_DIR --n=N --seed=S [--size=64]``: N scenes as ``scene_0000.png`` … and ``scenes.json``.
- ``pairs OUT_DIR --edit=E[,E2,...] --n=N --seed=S [--size=64]``: a training folder of N edited pairs
  (``control_images/``, ``training_images/`` with the instructions, ``pairs.json``); the edits are
  :data:`qflux.toy.edits.EDITS`.

A folder that already holds files is refused: nothing a user made is overwritten.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

from qflux.config.errors import QfluxError
from qflux.toy.edits import EDITS, write_pairs, write_scenes


def _fresh(out_dir: str) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise QfluxError(f"{out} already holds files; name a new or empty folder (nothing is overwritten)")
    return out


def _positive(n: int, size: int) -> None:
    if n < 1 or size < 16 or size % 16:
        raise QfluxError(f"--n must be at least 1 and --size a multiple of 16 from 16 up (got n={n}, size={size})")


def scenes(out_dir: str, n: int = 16, seed: int = 0, size: int = 64) -> None:
    """Write N scenes (PNG) and their descriptions (scenes.json) to OUT_DIR."""
    _positive(n, size)
    out = write_scenes(_fresh(out_dir), n, seed, size)
    print(f"wrote {n} scenes of {size}×{size} px to {out}")


def pairs(out_dir: str, edit: str | tuple[str, ...] = "recolour", n: int = 16, seed: int = 0, size: int = 64) -> None:
    """Write N (control, target, instruction) pairs of the named edit(s) to OUT_DIR, in the training layout."""
    names = [e.strip() for e in (edit.split(",") if isinstance(edit, str) else edit) if e.strip()]
    unknown = [e for e in names if e not in EDITS]
    if unknown or not names:
        raise QfluxError(f"--edit: unknown edit {unknown[0] if unknown else ''!r}; choose from {', '.join(EDITS)}")
    _positive(n, size)
    out = write_pairs(_fresh(out_dir), names, n, seed, size)
    print(f"wrote {n} pairs ({', '.join(names)}) of {size}×{size} px to {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point; a problem prints one line and exits 2."""
    try:
        fire.Fire({"scenes": scenes, "pairs": pairs}, command=sys.argv[1:] if argv is None else argv, name="qflux.toy")
    except QfluxError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
