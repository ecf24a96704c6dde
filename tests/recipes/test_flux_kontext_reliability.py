"""Runs that survive: exact resume after SIGKILL, kills during a checkpoint write, SIGTERM,
non-finite losses, incompatible resumes and bad data, on the tiny model in fp32."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config
from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from recipes.flux_kontext_lora import main
from recipes.flux_kontext_lora import train as run

ROOT = Path(__file__).resolve().parents[2]
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # four sizes in two buckets (64×64, 80×48), two of them cropped: resume keeps the bucketed order
    return make_synthetic_pairs(
        tmp_path_factory.mktemp("data"), 6, seed=2, sizes=((64, 64), (80, 48), (66, 62), (84, 52))
    )


def _args(model: Path, data: Path, out: Path, steps: int, **extra: object) -> list[str]:
    opts = {
        "model.pretrained_model_name_or_path": model,
        "model.dtype": "float32",
        "model.max_sequence_length": 16,
        "data.dataset_path": data,
        "train.max_train_steps": steps,
        "train.checkpointing_steps": 2,
        "train.checkpoints_total_limit": "null",
        "logging.output_dir": out,
        "logging.write_sample": "false",
        **extra,
    }
    return ["train", *(f"--{k}={v}" for k, v in opts.items())]


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "recipes.flux_kontext_lora", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for(proc: subprocess.Popen[str], ready, timeout: float = 120.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            return True
        if proc.poll() is not None:
            return bool(ready())
        time.sleep(0.0005)
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path, data: Path) -> dict[str, torch.Tensor]:
    """The LoRA of an uninterrupted 12-step run (in a subprocess, like the interrupted ones)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = _spawn(_args(tiny_flux_dir, data, out, 12))
    assert proc.wait(timeout=300) == 0, proc.stdout.read() if proc.stdout else ""
    return load_file(out / LORA)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_after_second_checkpoint_resumes_bitwise(
    tmp_path: Path, tiny_flux_dir: Path, data: Path, reference
) -> None:
    out = tmp_path / "run"
    proc = _spawn(_args(tiny_flux_dir, data, out, 12))
    assert _wait_for(proc, lambda: (out / "checkpoint-4" / "state.json").is_file())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / LORA).exists()  # killed before the end
    killed_at = latest_checkpoint(out)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < 12
    resumed = _spawn(_args(tiny_flux_dir, data, out, 12, resume_from_checkpoint="latest"))
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert f"resuming from '{killed_at}'" in log
    assert _same(load_file(out / LORA), reference)


def test_kill_during_checkpoint_write_keeps_previous(
    tmp_path: Path, tiny_flux_dir: Path, data: Path, reference
) -> None:
    for attempt in range(5):
        out = tmp_path / f"run{attempt}"
        proc = _spawn(_args(tiny_flux_dir, data, out, 12, **{"train.checkpointing_steps": 1}))

        def partial_seen(out: Path = out) -> bool:
            return out.is_dir() and any(p.name.startswith(".checkpoint-") for p in out.iterdir())

        caught = _wait_for(proc, partial_seen) and proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if caught and any(p.name.startswith(".checkpoint-") for p in out.iterdir()):
            break
    else:
        pytest.fail("could not kill the run while it wrote a checkpoint")
    previous = latest_checkpoint(out)
    if previous is not None:
        load_checkpoint(previous)  # the previous checkpoint is complete and loads
    resumed = _spawn(_args(tiny_flux_dir, data, out, 12, resume_from_checkpoint="latest"))
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "left by a checkpoint write that was interrupted" in log
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert _same(load_file(out / LORA), reference)


def test_sigterm_saves_and_exits_zero(tmp_path: Path, tiny_flux_dir: Path, data: Path, reference) -> None:
    out = tmp_path / "run"
    proc = _spawn(_args(tiny_flux_dir, data, out, 12))
    assert _wait_for(proc, lambda: (out / "checkpoint-2" / "state.json").is_file())
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    assert "interrupted by SIGTERM at step" in log and "--resume_from_checkpoint=latest" in log
    steps = [s for s, _ in list_checkpoints(out)]
    if steps[-1] < 12:  # stopped before the end: no final LoRA yet
        assert not (out / LORA).exists()
    resumed = _spawn(_args(tiny_flux_dir, data, out, 12, resume_from_checkpoint="latest"))
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert _same(load_file(out / LORA), reference)


def _cfg(model: Path, data: Path, out: Path, steps: int, **extra: object) -> FluxKontextConfig:
    args = _args(model, data, out, steps, **extra)[1:]
    overrides = dict(a[2:].split("=", 1) for a in args)
    return load_config(FluxKontextConfig, None, overrides)


def test_non_finite_steps_are_skipped_then_stop(tmp_path: Path, tiny_flux_dir: Path, data: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(tiny_flux_dir, data, out, 12, **{"optimizer.lr": 1e30, "train.max_nonfinite_steps": 3})
    with pytest.raises(QfluxError, match=r"3 steps in a row had a non-finite loss or gradient .*checkpoint-2"):
        run(cfg)
    assert [s for s, _ in list_checkpoints(out)] == [2]
    good = load_checkpoint(out / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in good.state.lora.values())
    assert not (out / LORA).exists()


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path: Path, tiny_flux_dir: Path, data: Path, capsys) -> None:
    result = run(_cfg(tiny_flux_dir, data, tmp_path / "run", 2, resume_from_checkpoint="latest"))
    assert result.state.step == 2 and "starting fresh" in capsys.readouterr().out


def test_incompatible_resume_names_keys(tmp_path: Path, tiny_flux_dir: Path, data: Path) -> None:
    out = tmp_path / "run"
    run(_cfg(tiny_flux_dir, data, out, 2))
    bad = _cfg(tiny_flux_dir, data, out, 4, resume_from_checkpoint="latest", **{"model.lora.r": 4, "seed": 3})
    with pytest.raises(QfluxError, match=r"model.lora.r \(checkpoint 16, now 4\); seed \(checkpoint 0, now 3\)"):
        run(bad)


def _digest_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        (lambda d: (d / "control_images" / "sample_001.png").write_bytes(b""), "sample_001.png: the file is empty"),
        (
            lambda d: (d / "training_images" / "sample_003.txt").write_bytes(b"\xff\xfe\xfa"),
            "sample_003.txt: not UTF-8",
        ),
        (lambda d: (d / "training_images" / "sample_004.txt").unlink(), "sample_004.txt: missing instruction file"),
    ],
)
def test_bad_data_stops_before_touching_outputs(
    tmp_path: Path, tiny_flux_dir: Path, damage, expect: str, capsys
) -> None:
    d = make_synthetic_pairs(tmp_path / "data", 6, seed=2)
    out = tmp_path / "run"
    run(_cfg(tiny_flux_dir, d, out, 2))
    before = _digest_tree(out)
    damage(d)
    with pytest.raises(SystemExit) as info:
        main(_args(tiny_flux_dir, d, out, 4))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert _digest_tree(out) == before


def test_no_pickle_loads_and_no_remote_code() -> None:
    proc = subprocess.run(
        ["grep", "-rnE", r"torch\.load\(|trust_remote_code|import pickle|pickle\.", "qflux", "recipes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.stdout == ""


def test_writes_stay_inside_output_and_cache_dirs(tmp_path: Path, tiny_flux_dir: Path) -> None:
    from PIL import Image

    d = make_synthetic_pairs(tmp_path / "data", 2, seed=0)
    # hostile-looking names: leading dots, glob characters, spaces
    for name in ("..evil", "[x]* y"):
        Image.open(d / "control_images" / "sample_000.png").save(d / "control_images" / f"{name}.png")
        Image.open(d / "training_images" / "sample_000.png").save(d / "training_images" / f"{name}.png")
        (d / "training_images" / f"{name}.txt").write_text("invert\n")
    from qflux.data.pairs import scan_pairs

    assert {s.name for s in scan_pairs(d, None, multiple=16)} == {"..evil", "[x]* y", "sample_000", "sample_001"}
    before = {p for p in tmp_path.rglob("*")}
    out, cache = tmp_path / "box" / "out", tmp_path / "box" / "cache"
    result = run(
        _cfg(
            tiny_flux_dir,
            d,
            out,
            2,
            **{
                "cache.use_cache": True,
                "cache.cache_dir": cache,
                "train.checkpointing_steps": 1,
                "logging.write_sample": True,
            },
        )
    )
    assert result.state.step == 2
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert written and all(p.is_relative_to(out) or p.is_relative_to(cache) for p in written)
