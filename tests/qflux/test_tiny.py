"""The tiny model builder is deterministic from its seed and writes the diffusers layout."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch

from qflux.models.flux_kontext.tiny import build_flux_kontext
from qflux.train.builtin import _build_once, resolve_dataset_path, resolve_model_path

ROOT = Path(__file__).resolve().parents[2]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path, tiny_flux_dir: Path) -> None:
    rng_before = torch.get_rng_state()
    again = build_flux_kontext(tmp_path / "again", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's global RNG is untouched
    assert _digest(again) == _digest(tiny_flux_dir)
    other = build_flux_kontext(tmp_path / "other", seed=1)
    assert _digest(other) != _digest(tiny_flux_dir)


def test_cli_builds_a_folder(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qflux.tiny", "flux_kontext", str(tmp_path / "m")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tmp_path / "m" / sub).is_dir(), sub
    assert (tmp_path / "m" / "model_index.json").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "qflux.tiny", "sdxl", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "unknown tiny model 'sdxl'" in bad.stderr


def test_builtins_resolve_and_are_reused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("QFLUX_HOME", str(tmp_path))
    assert resolve_model_path("/some/local/folder") == "/some/local/folder"
    assert resolve_dataset_path("/data/x") == Path("/data/x")
    train = resolve_dataset_path("builtin:synthetic")
    held = resolve_dataset_path("builtin:synthetic", heldout=True)
    assert train != held and len(list((train / "training_images").glob("*.txt"))) == 24
    calls = []
    first = _build_once("thing", lambda p: calls.append(p))
    second = _build_once("thing", lambda p: calls.append(p))
    assert first == second == tmp_path / "thing" and len(calls) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".thing-")]  # no temp folders left
