"""``python -m qflux.toy VERB``: the toy world's files.

- ``scenes OUT_DIR --n=N --seed=S [--size=64]``: N scenes as ``scene_0000.png`` … and ``scenes.json``.
- ``pairs OUT_DIR --edit=E[,E2,...] --n=N --seed=S [--size=64]``: a training folder of N edited pairs
  (``control_images/``, ``training_images/`` with the instructions, ``pairs.json``); the edits are
  :data:`qflux.toy.edits.EDITS`.

- ``build OUT_DIR [--family=F] [--seed=0] [--vae_steps=2000] [--steps=2400] [--pairs=6000]``: a
  family's toy model built from scratch on the world, in three stages (the random start, the VAE, the
  transformer; :mod:`qflux.toy.build`), its weights then stored in bf16 (what is committed), with
  ``toy_build.json`` saying what each stage cost and measured.
  ``--resume`` goes on from the last stage the folder finished.

- ``model OUT_DIR [--family=F]``: the committed toy model (``builtin:toy-flux-kontext`` names it). F is a family
  with a toy model; with one such family (today flux_kontext), it is the default.

A folder that already holds files is refused (``build --resume`` excepted): nothing a user made is overwritten.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import fire

from qflux.config.errors import QfluxError
from qflux.toy.edits import EDITS, write_pairs, write_scenes
from qflux.train.console import quiet_known_warnings

if TYPE_CHECKING:
    from qflux.train.family import ToyModel


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


def _toy(family: str | None) -> ToyModel:
    """The named family's toy model; with no name, the only family that has one."""
    quiet_known_warnings()  # the model families import diffusers (which imports torchao when it is installed)
    from qflux.models import FAMILIES  # deferred: only the model commands need the families

    have = [name for name, f in FAMILIES.items() if f.toy is not None]
    name = have[0] if family is None and len(have) == 1 else family
    toy = FAMILIES[name].toy if name is not None and name in FAMILIES else None
    if toy is None:
        raise QfluxError(f"--family: {family!r} has no toy model; choose from {', '.join(have)}")
    return toy


def model(out_dir: str, family: str | None = None) -> None:
    """Write FAMILY's committed toy model (a diffusers folder) to OUT_DIR."""
    out = _toy(family).write(_fresh(out_dir))
    print(f"wrote the toy model to {out}")


def build(out_dir: str, family: str | None = None, seed: int = 0, vae_steps: int = 2000, steps: int = 2400,
          pairs: int = 6000, resume: bool = False) -> None:  # fmt: skip
    """Build FAMILY's toy model in OUT_DIR from scratch (seeded); --resume skips the stages already done."""
    toy = _toy(family)
    from qflux.toy.build import RECORD, build_start, build_transformer, build_vae, store  # deferred: heavy
    from qflux.toy.pretraining import PretrainSettings
    from qflux.toy.vae_training import VaeSettings

    out = Path(out_dir) if resume else _fresh(out_dir)
    done = json.loads((out / RECORD).read_text()) if (out / RECORD).exists() else {}
    if "start" not in done:
        build_start(out, toy, seed)
    if "vae" not in done:
        print(f"toy VAE: held-out reconstruction {build_vae(out, toy, VaeSettings(steps=vae_steps, seed=seed)):.2f} dB")
    if "transformer" not in done:
        with tempfile.TemporaryDirectory(prefix="qflux-toy-") as work:
            settings = PretrainSettings(steps=steps, pairs=pairs, seed=seed)
            changed, unchanged = build_transformer(out, toy, settings, Path(work))
        print(f"toy transformer, taught edits on held-out scenes: psnr_changed {changed:.2f} dB, "
              f"psnr_unchanged {unchanged:.2f} dB")  # fmt: skip
    if "stored" not in done:
        store(out)
    print(f"toy model in {out} (what each stage cost and measured: {out / RECORD})")


def main(argv: list[str] | None = None) -> None:
    """Entry point; a problem prints one line and exits 2."""
    try:
        fire.Fire(
            {"scenes": scenes, "pairs": pairs, "build": build, "model": model},
            command=sys.argv[1:] if argv is None else argv,
            name="qflux.toy",
        )
    except QfluxError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
