"""Training checkpoints: atomic folders of safetensors and JSON that resume a run exactly.

``<output_dir>/checkpoint-<step>/`` holds

| file | content |
| --- | --- |
| ``pytorch_lora_weights.safetensors`` | the LoRA in diffusers format, loadable on its own |
| ``train_state.safetensors`` | the float32 LoRA tensors and the optimizer's state (AdamW or Prodigy), exactly |
| ``state.json`` | step, seed, data-loader position, non-finite counters, loss history |

:func:`save_loop_state` / :func:`load_loop_state` write and read the whole :class:`qflux.train.loop.LoopState`.
| ``config.yaml`` | the resolved config of the run |

A checkpoint is written into a hidden temporary folder that is renamed into place, so a kill
mid-save leaves the previous checkpoints intact and never a half one. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml
from safetensors.torch import load_file, save_file

from qflux.config.errors import QfluxError
from qflux.optim.adamw import AdamWState
from qflux.optim.prodigy import ProdigyState
from qflux.train.loop import LoopState, start_state
from qflux.train.state import OptState, TrainState

PREFIX = "checkpoint-"
STATE_FILE = "train_state.safetensors"
META_FILE = "state.json"
CONFIG_FILE = "config.yaml"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out_dir`` as (step, path), oldest first."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / META_FILE).is_file() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_partial(out_dir: str | Path) -> list[Path]:
    """Delete temporary folders left by checkpoint writes that were killed; returns what was removed."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(f".{PREFIX}")]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``out_dir``, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _state_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    out = {"count": state.opt.updates.detach().cpu()}
    for k in state.lora:
        out[f"lora/{k}"] = state.lora[k]
        out[f"exp_avg/{k}"] = state.opt.exp_avg[k]
        out[f"exp_avg_sq/{k}"] = state.opt.exp_avg_sq[k]
        if state.ema is not None:
            out[f"ema/{k}"] = state.ema[k]
    if isinstance(state.opt, ProdigyState):  # its scalars as prodigy/<name>, its other sums as <name>/<tensor>
        for name in PRODIGY_SCALARS:
            out[f"prodigy/{name}"] = getattr(state.opt, name)
        for k in state.lora:
            out[f"s/{k}"], out[f"p0/{k}"] = state.opt.s[k], state.opt.p0[k]
    # fresh CPU copies: the step's tensors are views of one flat vector, which safetensors cannot store
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}


PRODIGY_SCALARS = ("d", "d_max", "d_numerator")


def _opt_state(tensors: Mapping[str, torch.Tensor], names: list[str]) -> OptState:
    """The optimizer state a checkpoint's tensors hold: Prodigy's when they have its scalars, else AdamW's."""

    def per(key: str) -> dict[str, torch.Tensor]:
        return {k: tensors[f"{key}/{k}"] for k in names}

    if "prodigy/d" not in tensors:
        return AdamWState(tensors["count"], per("exp_avg"), per("exp_avg_sq"))
    d, d_max, numerator = (tensors[f"prodigy/{name}"] for name in PRODIGY_SCALARS)
    return ProdigyState(tensors["count"], d, d_max, numerator, per("exp_avg"), per("exp_avg_sq"), per("s"), per("p0"))


def save_checkpoint(
    out_dir: str | Path,
    state: TrainState,
    meta: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    write_lora: Callable[[Path], object],
    total_limit: int | None,
) -> Path:
    """Write ``checkpoint-<state.step>`` atomically, then keep only the newest ``total_limit``.

    Args:
        meta: JSON-serialisable run position (data position, counters, losses).
        config: the resolved config as a plain dict.
        write_lora: writes the diffusers-format LoRA into the folder it is given.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{state.step}.tmp-", dir=root))
    try:
        write_lora(tmp)
        save_file(_state_tensors(state), tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
        body = {"step": state.step, "seed": state.seed, **meta}
        (tmp / META_FILE).write_text(json.dumps(body, indent=1), encoding="utf-8")
        if final.exists():  # the same step saved again (a resumed run): swap, never a gap
            old = root / f".{PREFIX}{state.step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if total_limit is not None:
        for _, path in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


@attrs.frozen(eq=False)
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    state: TrainState
    meta: dict[str, Any]
    config: dict[str, Any]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`.

    Raises:
        QfluxError: the folder is not a complete, readable checkpoint.
    """
    p = Path(path)
    try:
        meta = json.loads((p / META_FILE).read_text(encoding="utf-8"))
        tensors = load_file(p / STATE_FILE)
        config = yaml.safe_load((p / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise QfluxError(f"'{p}' is not a readable qflux checkpoint: {e}") from None
    names = [k[len("lora/") :] for k in tensors if k.startswith("lora/")]
    state = TrainState(
        step=int(meta["step"]),
        lora={k: tensors[f"lora/{k}"] for k in names},
        opt=_opt_state(tensors, names),
        seed=int(meta["seed"]),
        ema={k: tensors[f"ema/{k}"] for k in names} if names and f"ema/{names[0]}" in tensors else None,
    )
    return Checkpoint(path=p, state=state, meta=meta, config=config)


def incompatibilities(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: list[str], defaults: Mapping[str, Any] | None = None
) -> list[str]:
    """Dotted ``keys`` whose values differ between two config dicts, as 'key (checkpoint X, now Y)';
    ``defaults`` gives the value of a key that a dict lacks (written before the key existed)."""

    def get(d: Mapping[str, Any], dotted: str) -> Any:
        node: Any = d
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None and defaults:
            node = defaults.get(dotted)
        return sorted(node) if isinstance(node, list) and dotted.endswith("target_modules") else node

    return [
        f"{k} (checkpoint {get(saved, k)!r}, now {get(current, k)!r})" for k in keys if get(saved, k) != get(current, k)
    ]


def save_loop_state(
    out_dir: str | Path,
    state: LoopState,
    config: Mapping[str, Any],
    *,
    write_lora: Callable[[Path], object],
    total_limit: int | None,
) -> Path:
    """Checkpoint the whole loop state (its pending metrics flushed first: :func:`qflux.train.loop.flush`)."""
    if state.pending:
        raise ValueError("flush the loop state's pending metrics before checkpointing it")
    counters = torch.stack([state.skipped, state.streak, state.worst]).tolist()  # one host sync
    meta = {
        "data_position": list(state.position),
        "losses": list(state.losses),
        "nonfinite_total": int(counters[0]),
        "nonfinite_streak": int(counters[1]),
        "nonfinite_worst": int(counters[2]),
    }
    return save_checkpoint(out_dir, state.train, meta, config, write_lora=write_lora, total_limit=total_limit)


def _opt_to(opt: OptState, device: torch.device, names: list[str]) -> OptState:
    """The optimizer state with its per-tensor parts on ``device``, keyed in the order of ``names``
    (Prodigy: its scalars too; AdamW's count stays a CPU scalar, as it starts)."""
    moved: list[Any] = [{k: f[k].to(device) for k in names} if isinstance(f, dict) else f for f in opt]
    if isinstance(opt, ProdigyState):
        scalars: list[Any] = [f.to(device) if isinstance(f, torch.Tensor) else f for f in moved]
        return ProdigyState(*scalars)
    return AdamWState(*moved)


def load_loop_state(ckpt: Checkpoint, device: torch.device, order: list[str] | None = None) -> LoopState:
    """The loop state a checkpoint holds, its tensors on ``device``. A checkpoint written before the
    streak was saved resumes with a streak of 0.

    Args:
        order: the run's LoRA tensor names in its own order (its fresh state's). A checkpoint's tensors
            come back sorted by name (safetensors' order), and the step concatenates them in the dict's
            order into the flat vectors whose sums (Prodigy's Σ|s| and ⟨g, p0 − p⟩, the clipping norm)
            round by that order: a resumed run must flatten as the straight one did to repeat it bit for bit.
    """
    train = ckpt.state
    names = list(train.lora) if order is None else list(order)
    moved = attrs.evolve(
        train,
        lora={k: train.lora[k].to(device) for k in names},
        ema=None if train.ema is None else {k: train.ema[k].to(device) for k in names},
        opt=_opt_to(train.opt, device, names),
    )
    meta = ckpt.meta
    return start_state(
        moved,
        position=tuple(meta.get("data_position", (0, 0))),
        losses=meta.get("losses", []),
        skipped=int(meta.get("nonfinite_total", 0)),
        streak=int(meta.get("nonfinite_streak", 0)),
        worst=int(meta.get("nonfinite_worst", 0)),
    )
