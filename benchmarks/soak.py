"""A long run of the real training loop on the tiny model, watching the process's memory for leaks.

    python benchmarks/soak.py [--steps=1000] [--every=50] [--recipe=flux_kontext_lora]

Runs ``python -m recipes.<recipe> train`` on the built-in tiny model and synthetic dataset (the
default run) for ``steps`` steps in a child process, with scalars to ``metrics.jsonl`` (written every
10 steps), and a checkpoint (the last 3 kept) and validation every ``every`` steps: the loop, the
data stream, logging, checkpoints and validation all repeat many times. The parent reads the
child's resident set size (``VmRSS`` in /proc) each time the run passes a multiple of ``every``
steps, once that step's checkpoint folder and then its loss plot are written: every sample is taken
at the same point of the cycle (its validation and checkpoint done), and the one-time costs of the
first checkpoint (its writers, the loss plot's imports) are in every sample. Growth is the mean RSS
of the last quarter of the samples minus the mean of the first quarter. Ends with one line (growth must be under 5 MB):

    RESULT name=soak recipe=… steps=… rss_first_mb=… rss_last_mb=… rss_growth_mb=… s_per_step=…
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _last_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    lines = metrics.read_text().splitlines()
    steps = [json.loads(line).get("step", 0) for line in lines[-20:] if line.strip().startswith("{")]
    return max(steps, default=0)


def _after_checkpoint(out: Path, step: int) -> bool:
    """Whether the checkpoint hook of ``step`` is done: its folder written, then the loss plot."""
    folder, plot = out / f"checkpoint-{step}", out / "loss.png"
    try:
        return folder.is_dir() and plot.stat().st_mtime >= folder.stat().st_mtime
    except FileNotFoundError:
        return False


def main(steps: int = 1000, every: int = 50, recipe: str = "flux_kontext_lora") -> None:
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "run"
        command = [
            sys.executable, "-m", f"recipes.{recipe}", "train", f"--train.max_train_steps={steps}",
            f"--logging.output_dir={out}", "--logging.report_to=jsonl", "--logging.write_sample=false",
            f"--train.checkpointing_steps={every}", "--train.checkpoints_total_limit=3",
            "--validation.enabled=true", f"--validation.validation_steps={every}",
        ]  # fmt: skip
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        log_file = (Path(work) / "run.log").open("w")  # a file, not a pipe: a full pipe would stall the run
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        metrics = out / "logs" / "metrics.jsonl"
        samples: dict[int, float] = {}
        while child.poll() is None:
            mark = _last_step(metrics) // every * every
            saved = _after_checkpoint(out, mark)
            rss = _rss_mb(child.pid)
            if mark and saved and mark not in samples and rss is not None:
                samples[mark] = rss
                print(f"step {mark:5d}  rss {rss:8.1f} MB", flush=True)
            time.sleep(0.05)
        log_file.close()
        log = (Path(work) / "run.log").read_text()
        if child.returncode != 0:
            print(log[-4000:])
            raise SystemExit(f"the run failed with exit status {child.returncode}")
        seconds = time.perf_counter() - start
    values = [samples[k] for k in sorted(samples)]
    quarter = max(1, len(values) // 4)
    first, last = sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter
    print(f"RESULT name=soak recipe={recipe} steps={steps} samples={len(values)} rss_first_mb={first:.1f} "
          f"rss_last_mb={last:.1f} rss_growth_mb={last - first:.2f} s_per_step={seconds / steps:.4f}")  # fmt: skip


if __name__ == "__main__":
    import fire

    fire.Fire(main)
