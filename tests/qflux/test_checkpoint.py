"""Checkpoint folders: exact round trip, atomic replacement, pruning, and config comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qflux.config.errors import QfluxError
from qflux.optim.adamw import adamw_update
from qflux.train.checkpoint import (
    incompatibilities,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)
from qflux.train.state import init_train_state


def _state(step: int):
    g = torch.Generator().manual_seed(step)
    lora = {
        "a.lora_A.default.weight": torch.randn(2, 3, generator=g),
        "a.lora_B.default.weight": torch.randn(3, 2, generator=g),
    }
    state = init_train_state(lora, seed=7)
    grads = {k: torch.randn(v.shape, generator=g) for k, v in lora.items()}
    params, opt = adamw_update(
        grads, state.opt, state.lora, lr=torch.tensor(0.1), betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0
    )
    return type(state)(step=step, lora=params, opt=opt, seed=7)


def _write_lora(folder: Path) -> None:
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"lora")


def test_round_trip_is_exact(tmp_path: Path) -> None:
    state = _state(4)
    path = save_checkpoint(
        tmp_path, state, {"data_position": [1, 2]}, {"seed": 7}, write_lora=_write_lora, total_limit=None
    )
    assert path.name == "checkpoint-4"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml", "pytorch_lora_weights.safetensors", "state.json", "train_state.safetensors"
    ]  # fmt: skip
    ck = load_checkpoint(path)
    assert ck.state.step == 4 and ck.state.seed == 7 and ck.meta["data_position"] == [1, 2]
    assert ck.config == {"seed": 7}
    assert torch.equal(ck.state.opt.updates, state.opt.updates) and ck.state.opt.updates.dtype == torch.float64
    for k in state.lora:
        assert torch.equal(ck.state.lora[k], state.lora[k])
        assert torch.equal(ck.state.opt.exp_avg[k], state.opt.exp_avg[k])
        assert torch.equal(ck.state.opt.exp_avg_sq[k], state.opt.exp_avg_sq[k])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prune_keeps_newest_and_resave_replaces(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, _state(step), {}, {}, write_lora=_write_lora, total_limit=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 8]
    save_checkpoint(tmp_path, _state(8), {"again": True}, {}, write_lora=_write_lora, total_limit=2)
    assert json.loads((tmp_path / "checkpoint-8" / "state.json").read_text())["again"] is True
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-8"


def test_incomplete_and_partial_folders_are_ignored_and_removed(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "none") is None and remove_partial(tmp_path / "none") == []
    save_checkpoint(tmp_path, _state(2), {}, {}, write_lora=_write_lora, total_limit=None)
    (tmp_path / "checkpoint-9").mkdir()  # no state files: not complete
    (tmp_path / ".checkpoint-4.tmp-abc").mkdir()  # a write that was killed
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert [p.name for p in remove_partial(tmp_path)] == [".checkpoint-4.tmp-abc"]
    with pytest.raises(QfluxError, match="not a readable qflux checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-9")


def test_failed_write_leaves_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state(2), {}, {}, write_lora=_write_lora, total_limit=None)

    def boom(folder: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _state(4), {}, {}, write_lora=boom, total_limit=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert load_checkpoint(tmp_path / "checkpoint-2").state.step == 2


def test_incompatibilities_name_keys() -> None:
    saved = {"model": {"lora": {"r": 16, "target_modules": ["to_q", "to_k"]}}, "seed": 0}
    same = {"model": {"lora": {"r": 16, "target_modules": ["to_k", "to_q"]}}, "seed": 0}
    keys = ["model.lora.r", "model.lora.target_modules", "seed"]
    assert incompatibilities(saved, same, keys) == []
    other = {"model": {"lora": {"r": 8, "target_modules": ["to_q"]}}, "seed": 0}
    assert incompatibilities(saved, other, keys) == [
        "model.lora.r (checkpoint 16, now 8)",
        "model.lora.target_modules (checkpoint ['to_k', 'to_q'], now ['to_q'])",
    ]
