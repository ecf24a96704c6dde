"""torchrun with 2 ranks (gloo, CPU) against one process: the same optimizer steps with DDP and
FSDP2, an exact resume after SIGKILL, and files written by rank 0 only."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qflux.config.parse import load_config
from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.flux_kontext.config import FluxKontextConfig
from recipes.flux_kontext_lora import train as run

ROOT = Path(__file__).resolve().parents[2]
LORA = "pytorch_lora_weights.safetensors"
STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # three sizes cropped into one bucket (64×48): every global batch of 2 splits into two ranks of 1
    return make_synthetic_pairs(tmp_path_factory.mktemp("data"), 6, seed=3, sizes=((64, 48), (66, 50), (62, 47)))


def _opts(model: Path, data: Path, out: Path, batch: int, steps: int = STEPS, **extra: object) -> dict[str, object]:
    return {
        "model.pretrained_model_name_or_path": str(model),
        "model.dtype": "float32",
        "model.max_sequence_length": 8,
        "data.dataset_path": str(data),
        "data.batch_size": batch,
        "data.caption_dropout_rate": 0.5,  # draws that must not depend on the rank
        "data.prompt_image_dropout_rate": 0.5,
        "train.max_train_steps": steps,
        "train.checkpointing_steps": 0,
        "logging.output_dir": str(out),
        "logging.write_sample": False,
        "logging.report_to": "tensorboard",
        **extra,
    }


def _torchrun(opts: dict[str, object], recipe: str = "recipes.flux_kontext_lora") -> subprocess.Popen[str]:
    args = [f"--{k}={v}" for k, v in opts.items()]
    with socket.socket() as sock:  # a free port for the rendezvous (torchrun cannot take port 0)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    return subprocess.Popen(
        [*launcher, "-m", recipe, "train", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each rank in its own session)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: Path, data: Path) -> dict[str, torch.Tensor]:
    """One process, batch 2."""
    out = tmp_path_factory.mktemp("single")
    run(load_config(FluxKontextConfig, None, _opts(tiny_flux_dir, data, out, batch=2)))
    return load_file(out / LORA)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_of_batch_1_equal_one_process_of_batch_2(
    engine: str, single: dict[str, torch.Tensor], tiny_flux_dir: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    log = _finish(_torchrun(_opts(tiny_flux_dir, data, out, batch=1, **{"train.distributed": engine})))
    assert log.count("\nwrote:\n") == 1  # rank 0 alone prints
    assert ("frozen base sharded across 2 ranks" in log) == (engine == "fsdp")
    _close(load_file(out / LORA), single)
    # rank 0 alone writes: one event file (its name carries the writer's pid), no stray outputs
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert [f for f in files if ".tfevents." in f] == [f for f in files if f.startswith("logs/")]
    assert len([f for f in files if ".tfevents." in f]) == 1
    assert {f for f in files if not f.startswith("logs/")} == {
        "config.yaml",
        "loss.png",
        LORA,
        "pytorch_lora_weights_comfyui.safetensors",
        *(f"checkpoint-4/{name}" for name in ("config.yaml", "state.json", "train_state.safetensors", LORA)),
    }


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_qwen_two_ranks_of_batch_1_equal_one_process_of_batch_2(engine: str, data: Path, tmp_path: Path) -> None:
    """The Qwen-Image-Edit recipe runs the same loop under torchrun, on every linear layer: the adapters of
    the last block's dropped text stream reduce as zero gradients on both ranks (no crash, named once). Both
    preservation terms and token routing are on: their base forwards run on the sharded base too, and the routed
    tokens are the same on both ranks as in one process."""
    from qflux.models.qwen_image_edit.config import QwenImageEditConfig
    from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
    from recipes.qwen_image_edit_lora import train as qwen_run

    model = build_qwen_image_edit(tmp_path / "model", seed=0)
    opts = {k: v for k, v in _opts(model, data, tmp_path, batch=1).items() if k != "model.max_sequence_length"}
    opts |= {"model.lora.target_modules": "[all-linear]", "model.lora.r": 4, "train.distributed": engine,
             "train.loss_mask": "auto", "train.preserve": "base", "train.preserve_prompt": "a photo",
             # routed: one subset per step from its keys on 1 or 2 ranks (a changed region kept per rank would differ)
             "train.route": "tread", "train.route_blocks": "[0,-1]", "train.route_keep_changed": False}  # fmt: skip
    single = tmp_path / "single"
    qwen_run(load_config(QwenImageEditConfig, None, {**opts, "data.batch_size": 2, "logging.output_dir": str(single)}))
    out = tmp_path / "out"
    log = _finish(_torchrun({**opts, "logging.output_dir": str(out)}, recipe="recipes.qwen_image_edit_lora"))
    assert log.count("\nwrote:\n") == 1
    assert log.count("4 adapter layer(s) get no gradient") == 1
    _close(load_file(out / LORA), load_file(single / LORA))


def test_a_killed_two_rank_run_resumes_to_the_same_lora(tiny_flux_dir: Path, data: Path, tmp_path: Path) -> None:
    steps = 40  # long enough (about 3 s) to be killed after its first checkpoint
    extra = {"train.checkpointing_steps": 2, "train.checkpoints_total_limit": "null", "logging.report_to": "none"}
    whole = tmp_path / "whole"
    _finish(_torchrun(_opts(tiny_flux_dir, data, whole, batch=1, steps=steps, **extra)))

    cut = tmp_path / "cut"
    proc = _torchrun(_opts(tiny_flux_dir, data, cut, batch=1, steps=steps, **extra))
    deadline = time.monotonic() + 300
    while not (cut / "checkpoint-2" / "state.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    _kill_tree(proc.pid)  # the launcher and every rank, at once
    proc.communicate(timeout=60)
    assert not (cut / LORA).exists(), "the run finished before it could be killed"
    assert (cut / "checkpoint-2").is_dir()

    resumed = _finish(
        _torchrun(_opts(tiny_flux_dir, data, cut, batch=1, steps=steps, resume_from_checkpoint="latest", **extra))
    )
    assert "resuming from" in resumed
    _close(load_file(cut / LORA), load_file(whole / LORA))
