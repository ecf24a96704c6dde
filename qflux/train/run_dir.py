"""A run's output folder: what a finished or checkpointed run leaves there, and keeping runs apart.

A fresh run never writes into a folder that holds another run's LoRA or checkpoints: it would
overwrite that LoRA and leave the other run's checkpoints for a later ``--resume_from_checkpoint=latest``
to pick up. :func:`claim_output_dir` refuses such a folder, touching nothing, unless
``logging.overwrite`` is set; then it removes what qflux wrote there (and nothing else) and lists it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qflux.config.errors import QfluxError
from qflux.lora.adapter import COMFYUI_WEIGHT_NAME, EMA_COMFYUI_WEIGHT_NAME, EMA_WEIGHT_NAME, LORA_WEIGHT_NAME
from qflux.train.checkpoint import PREFIX, list_checkpoints

LORA_FILES = (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME, EMA_WEIGHT_NAME, EMA_COMFYUI_WEIGHT_NAME)
"""The final LoRA files a run writes."""
DERIVED = ("config.yaml", "loss.png", "sample.png", "validation", "data_warnings.txt")
"""What else a run writes beside its LoRA and checkpoints (the logging folder is named by the config)."""


def previous_run(out: Path) -> list[Path]:
    """The final LoRA files and complete checkpoints of a run in ``out`` (empty: no run there)."""
    if not out.is_dir():
        return []
    return [out / name for name in LORA_FILES if (out / name).is_file()] + [p for _, p in list_checkpoints(out)]


def run_outputs(out: Path, logging_dir: str) -> list[Path]:
    """Everything qflux writes in ``out``: LoRA files, checkpoints (partial ones too), the resolved
    config, pictures, validation grids and the logging folder."""
    if not out.is_dir():
        return []
    named = [out / n for n in (*LORA_FILES, *DERIVED)] + [out / logging_dir]
    checkpoints = [p for p in out.iterdir() if p.is_dir() and p.name.lstrip(".").startswith(PREFIX)]
    return [p for p in named if p.exists()] + sorted(checkpoints)


def claim_output_dir(
    out: Path,
    *,
    logging_dir: str,
    overwrite: bool,
    wanted_resume: bool = False,
    keep: dict[str, Path] | None = None,
) -> list[Path]:
    """Make ``out`` ready for a fresh run: refuse it while it holds another run, or (``overwrite``)
    remove everything qflux wrote there first.

    Args:
        wanted_resume: the run asked to resume (``latest``) but found no checkpoint (the message
            says so instead of suggesting it).
        keep: {config key: path} of files this run reads (``model.lora.pretrained_weight``); an
            overwrite that would remove one is refused.

    Returns:
        What was removed (empty unless ``overwrite`` found a run).

    Raises:
        QfluxError: ``out`` holds another run's LoRA or checkpoints and ``overwrite`` is off; nothing
            was touched.
    """
    found = previous_run(out)
    if not found:
        return []
    if not overwrite:
        shown = ", ".join(p.name for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        resume = (
            "it has no checkpoint to resume from"
            if wanted_resume
            else "to continue it, add --resume_from_checkpoint=latest"
        )
        raise QfluxError(
            f"logging.output_dir '{out}' holds another run ({shown}); nothing was changed. {resume[0].upper()}"
            f"{resume[1:]}; to replace it, set logging.overwrite: true (its files are removed first); or choose "
            "another logging.output_dir"
        )
    removed = run_outputs(out, logging_dir)
    for key, path in (keep or {}).items():
        if any(path.resolve() == p.resolve() or p.resolve() in path.resolve().parents for p in removed):
            raise QfluxError(
                f"logging.overwrite would remove {key} '{path}', which this run reads; copy it out of "
                f"'{out}' first, or choose another logging.output_dir"
            )
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return removed
