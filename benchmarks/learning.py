"""Does a LoRA trained with the FLUX.1 Kontext recipe's default settings learn an edit the toy model was
never taught, and does the diffusers reference loop, at the same settings, learn the same?

    python benchmarks/learning.py [--edits=darken,grayscale] [--pairs=64] [--heldout=16] [--steps=300]
                                  [--reference=True] [--sample_steps=28] [--out=DIR] [--set=KEY=VALUE,...]
                                  [--rows=objective|prompt] [--other=recolour]

Per edit of ``--edits`` (the untaught ones: ``darken``, ``grow``, ``shrink`` and ``invert_shape`` are local,
``grayscale``, ``mirror`` and ``invert`` global; :data:`qflux.toy.edits.EDITS`):

1. Writes ``pairs`` training pairs (seed 0) and ``heldout`` held-out pairs (seed 1) of the toy world
   (:func:`qflux.toy.edits.write_pairs`) under ``--out`` (default: a fresh temporary folder).
2. Trains with ``recipes/flux_kontext_lora.py``'s ``train(cfg)`` at the config's defaults (the toy model
   ``builtin:toy-flux-kontext``, rank 16, AdamW at 1e-3, batch 8, ``train.loss_mask: auto``, bf16 frozen
   weights, ...); only the dataset, ``train.max_train_steps``, the output folder and ``logging.report_to:
   none`` are set, plus ``--set``'s overrides for experiments (a dict, or ``key=value,key=value``).
3. With ``--reference``: resets the adapter of the same transformer to the run's initial LoRA and trains it
   the way diffusers' ``train_dreambooth_lora_flux_kontext.py`` does (``_reference_step`` of
   benchmarks/train_step.py: peft adapter, ``backward()``, ``clip_grad_norm_``, ``torch.optim.AdamW``; the
   loss mask's pixel weights in its own few lines, as the diffusers script has none) on
   exactly the batches qflux's loop drew: the same batch stream, conditioning, dropout, noise and σ, keyed
   by (seed, step, micro-batch, sample) as :func:`qflux.train.start.step_taker` keys them.
4. Scores the base model (the initial LoRA, B = 0), qflux's LoRA and the reference LoRA on the held-out
   pairs with the same sampler steps and seed (:func:`qflux.toy.pretraining.edit_scores`): psnr_changed
   (the edit against the target inside the change mask) and psnr_unchanged (against the control outside
   it: for ``grayscale`` the pixels already gray, for ``invert`` only the gray ones, which it moves by one
   level; NaN where there are none).

The bars: psnr_changed at least 5 dB above the base (``gain``), psnr_unchanged at most 1 dB below it
(``unchanged_drop``), in at most 300 steps and 5 minutes on 2 CPU cores, and qflux's gains
equal to the reference's within run-to-run noise. Seconds per step (``s``, ``ref_s``) are the median wall
time of a training step, batch preparation (encoding, draws) included, for both loops: the median leaves
out one-time costs (qflux's first step also runs the check for adapters the loss does not reach; the
reference runs second, in a warm process), which ``total_s`` keeps. Both loops see identical batches and,
at equal LoRA tensors, compute bit-identical losses and gradients; only the two AdamW implementations round
differently (~1e-7), which the bf16 frozen base amplifies as the weights drift apart, so the LoRA max rel
diff (the largest ‖qflux − reference‖ / ‖reference‖ over the adapter's tensors) is ~1e-6 after a few
steps with ``--set=model.dtype=float32`` and ~1e-3 at the default bf16.

Prints one line per edit, then:

    RESULT name=learning <edit>_base_changed=… <edit>_changed=… <edit>_gain=… <edit>_unchanged_drop=…
           <edit>_ref_changed=… <edit>_ref_gain=… <edit>_s=… <edit>_ref_s=… ... total_s=…

With ``--rows=objective`` (or ``prompt``, ``control``, ``cost``) it trains each row of :data:`ROWS` (the
preservation, loss and timestep options and the control's size, one override set each) on every edit without the
reference, prints a table and ``RESULT name=learning_objective``. ``--other=EDIT`` also scores the base and each
LoRA on a taught edit's held-out pairs (seed 2): what training one edit did to another (``other_drop``), which is
what a preserve prompt claims to keep.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qflux.config.parse import load_config
from qflux.data.dataset import collate_pairs
from qflux.data.order import batch_stream
from qflux.data.pairs import PairSample
from qflux.models.flux_kontext import FAMILY
from qflux.models.flux_kontext.batch import encode_conditioning, text_tensors, to_batch
from qflux.models.flux_kontext.conditioning import encode_prompt_with, text_length
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.flux_kontext.loss import FluxKontextBatch
from qflux.models.flux_kontext.toy import toy_paths
from qflux.optim.schedules import learning_rate
from qflux.toy.edits import write_pairs
from qflux.toy.pretraining import edit_scores
from qflux.train.batch import DataPath, Draws, prepare, with_mask
from qflux.train.run import RunResult, dataset_samples, family_folder, pair_dataset
from recipes import flux_kontext_lora

Lora = dict[str, torch.Tensor]


def parse_set(extra: str | Mapping[str, Any] | tuple[str, ...]) -> dict[str, Any]:
    """``--set``'s overrides as {dotted key: value}: a dict, or ``key=value,key=value`` text (fire may
    hand the text over split at its commas)."""
    if isinstance(extra, Mapping):
        return dict(extra)
    text = ",".join(extra) if isinstance(extra, tuple | list) else str(extra)
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--set takes key=value,key=value (or a dict); got {extra!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def run_config(train_dir: Path, out: Path, steps: int, extra: Mapping[str, Any]) -> FluxKontextConfig:
    """The recipe's default config on ``train_dir`` for ``steps`` steps, writing to ``out``, with ``extra``."""
    overrides = {
        "data.dataset_path": str(train_dir),
        "train.max_train_steps": steps,
        "logging.output_dir": str(out),
        "logging.report_to": "none",
        "logging.overwrite": True,  # a rerun into the same --out replaces the previous run
        **extra,
    }
    return load_config(FluxKontextConfig, None, overrides)


def check_reference(cfg: FluxKontextConfig) -> None:
    """Refuse settings the reference step cannot mirror (it takes one micro-batch per AdamW step, weighted only
    by ``train.loss_mask``'s pixel weights)."""
    t = cfg.train
    unsupported = {
        "optimizer.name": cfg.optimizer.name != "adamw",
        "train.gradient_accumulation_steps": t.gradient_accumulation_steps != 1,
        "train.weighting_scheme": t.weighting_scheme != "none",
        "train.ema_decay": t.ema_decay is not None,
        "train.loss": t.loss != "mse",
        "train.preserve": t.preserve != "none",
    }
    named = [k for k, bad in unsupported.items() if bad]
    if named:
        raise SystemExit(f"the reference loop cannot mirror {', '.join(named)}; drop it or pass --reference=False")


def samples_of(cfg: FluxKontextConfig, folder: Path) -> list[PairSample]:
    """The pairs of ``folder``, scanned and sized as the recipe scans its dataset."""
    at = attrs.evolve(cfg, data=attrs.evolve(cfg.data, dataset_path=str(folder)))
    return dataset_samples(at, family_folder(cfg, FAMILY), flux_kontext_lora.PAIRS)


def recipe_data(cfg: FluxKontextConfig, models: Any) -> DataPath:
    """The recipe's uncached data path (``flux_kontext_lora._inputs``): pairs encoded by the loaded encoders."""
    path = family_folder(cfg, FAMILY)
    seq = text_length(cfg.model.max_sequence_length, path)
    empty = text_tensors(encode_prompt_with(models, [""], seq))
    encode = with_mask(partial(encode_conditioning, models, max_sequence_length=seq))
    return DataPath(pair_dataset(cfg, path), collate_pairs, encode, empty)


def loop_batches(cfg: FluxKontextConfig, models: Any, device: torch.device) -> Iterator[FluxKontextBatch]:
    """The batches qflux's loop trained on, step after step: :func:`qflux.train.driver.train_loop`'s stream and
    :func:`qflux.train.start.step_taker`'s draws, keyed (seed, step, micro-batch 0) from the first sample's
    offset in the global batch (one process, one micro-batch per step)."""
    data, samples = recipe_data(cfg, models), samples_of(cfg, Path(cfg.data.dataset_path))
    stream = batch_stream(
        data.make_dataset(samples), samples, cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
        num_workers=cfg.data.num_workers, collate_fn=data.collate, drop_last=cfg.data.drop_last,
    )  # fmt: skip
    draws, sched = Draws.from_config(cfg.data, cfg.train), models.scheduler.config
    for step in range(cfg.train.max_train_steps):
        _, raw = next(stream)
        cond = data.to_conditioning(raw)
        yield to_batch(prepare(draws, sched, cond, data.empty, (cfg.seed, step, 0), device, raw["offset"]))


def trainable_adapter(transformer: Any, lora0: Mapping[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    """The transformer's adapter parameters (named as qflux's LoRA dict: module parameter names), reset to
    ``lora0`` in float32 and trainable; the frozen base stays frozen."""
    params = dict(transformer.named_parameters())
    missing = [k for k in lora0 if k not in params]
    if missing:
        raise SystemExit(f"qflux's LoRA key {missing[0]!r} names no parameter of the transformer")
    for name, p in params.items():
        if name in lora0:
            p.data = lora0[name].detach().to(p.device, torch.float32).clone()
        p.requires_grad_(name in lora0)
    return {k: params[k] for k in lora0}


def reference_train(cfg: FluxKontextConfig, result: RunResult) -> tuple[Lora, float]:
    """Train the run's transformer's own adapter from the run's initial LoRA as the diffusers script does, on
    the loop's batches; returns (the LoRA, median seconds per step, batch preparation included)."""
    from train_step import _reference_step  # benchmarks/train_step.py (this script's folder is on sys.path)

    transformer, opt_cfg, sch = result.models.transformer, cfg.optimizer, cfg.lr_scheduler
    params = trainable_adapter(transformer, result.initial_lora)
    opt = torch.optim.AdamW(params.values(), lr=opt_cfg.peak_lr, betas=opt_cfg.betas,
                            weight_decay=opt_cfg.weight_decay, eps=opt_cfg.eps)  # fmt: skip
    clip = math.inf if cfg.train.max_grad_norm is None else cfg.train.max_grad_norm
    batches, seconds = loop_batches(cfg, result.models, next(iter(params.values())).device), []
    for step in range(cfg.train.max_train_steps):
        start = time.perf_counter()
        lr = learning_rate(step, base_lr=opt_cfg.peak_lr, kind=sch.scheduler_type, warmup_steps=sch.warmup_steps,
                           total_steps=cfg.train.max_train_steps, num_cycles=sch.num_cycles)  # fmt: skip
        for group in opt.param_groups:
            group["lr"] = lr
        _reference_step(transformer, list(params.values()), opt, next(batches), cfg.model.guidance_scale, clip,
                        cfg.train.unmasked_weight)  # fmt: skip
        seconds.append(time.perf_counter() - start)
    lora = {k: p.detach().clone() for k, p in params.items()}
    trainable_adapter(transformer, result.initial_lora)  # the module as the run left it (the LoRA at its init)
    for p in params.values():
        p.requires_grad_(False)
    return lora, statistics.median(seconds)


def rel_diffs(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """‖a − b‖ / ‖b‖ of each tensor of two LoRAs with the same keys."""
    return {k: float((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-30)) for k in b}


def run_edit(edit: str, root: Path, *, pairs: int, heldout: int, steps: int, reference: bool,
             sample_steps: int, extra: Mapping[str, Any], other: str = "") -> dict[str, float]:  # fmt: skip
    """Train on ``edit`` (qflux, then the reference) and score the base and both LoRAs; the edit's figures. With
    ``other``, a taught edit: the base and the LoRA also do it on its held-out pairs (what the LoRA did to an edit
    it was not trained on: ``other_drop`` = the base's psnr_changed there minus the LoRA's)."""
    train_dir = write_pairs(root / edit / "train", [edit], pairs, seed=0)
    held_dir = write_pairs(root / edit / "heldout", [edit], heldout, seed=1)
    cfg = run_config(train_dir, root / edit / "qflux", steps, extra)
    if reference:
        check_reference(cfg)
    result = flux_kontext_lora.train(cfg)
    data, ops = toy_paths(result.models)
    held = samples_of(cfg, held_dir)

    def score(lora: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        return edit_scores(data, ops, held, dict(lora), sample_steps)

    (base_c, base_u), (c, u) = score(result.initial_lora), score(result.state.lora)
    out = {"base_changed": base_c, "base_unchanged": base_u, "changed": c, "unchanged": u,
           "gain": c - base_c, "unchanged_drop": base_u - u,
           "s": statistics.median(result.step_seconds)}  # fmt: skip
    if other:
        other_held = samples_of(cfg, write_pairs(root / edit / f"heldout-{other}", [other], heldout, seed=2))
        (base_o, _), (lora_o, _) = (edit_scores(data, ops, other_held, dict(lo), sample_steps)
                                    for lo in (result.initial_lora, result.state.lora))  # fmt: skip
        out |= {"other_base_changed": base_o, "other_changed": lora_o, "other_drop": base_o - lora_o}
    if result.state.ema is not None:  # train.ema_decay: the moving average, scored too
        ema_c, ema_u = score(result.state.ema)
        out |= {"ema_changed": ema_c, "ema_gain": ema_c - base_c, "ema_unchanged_drop": base_u - ema_u}
    if reference:
        ref, ref_s = reference_train(cfg, result)
        ref_c, ref_u = score(ref)
        diffs = rel_diffs(result.state.lora, ref)
        worst = max(diffs, key=lambda k: diffs[k])
        print(
            f"{edit}: LoRA rel diff (qflux against reference) largest {diffs[worst]:.2e} on {worst}, "
            f"median {statistics.median(diffs.values()):.2e} over {len(diffs)} tensors"
        )
        out |= {"ref_changed": ref_c, "ref_unchanged": ref_u, "ref_gain": ref_c - base_c,
                "ref_unchanged_drop": base_u - ref_u, "ref_s": ref_s,
                "lora_rel_diff": diffs[worst], "lora_rel_diff_median": statistics.median(diffs.values())}  # fmt: skip
    return out


def line(edit: str, r: Mapping[str, float]) -> str:
    """One readable line of an edit's figures (dB; s/step)."""
    text = (f"{edit}: base {r['base_changed']:.2f} / {r['base_unchanged']:.2f} dB (changed / unchanged), "
            f"qflux {r['changed']:.2f} / {r['unchanged']:.2f}")  # fmt: skip
    if "ref_changed" in r:
        text += f", reference {r['ref_changed']:.2f} / {r['ref_unchanged']:.2f}"
    text += f"; gain {r['gain']:+.2f} dB, unchanged drop {r['unchanged_drop']:.2f} dB"
    if "ref_gain" in r:
        text += f" (reference gain {r['ref_gain']:+.2f}, drop {r['ref_unchanged_drop']:.2f})"
    text += f"; median {r['s']:.3f} s/step"
    if "ref_s" in r:
        text += f" (reference {r['ref_s']:.3f}); LoRA rel diff median {r['lora_rel_diff_median']:.2e}"
        text += f", max {r['lora_rel_diff']:.2e}"
    return text


RESULT_KEYS = ("base_changed", "changed", "gain", "unchanged_drop", "ref_changed", "ref_gain", "s", "ref_s",
               "ema_changed", "ema_gain", "ema_unchanged_drop")  # fmt: skip
"""The RESULT line's figures per edit (the ``ref_`` ones with ``--reference``, the ``ema_`` ones with
``train.ema_decay``)."""


ROWS: dict[str, dict[str, dict[str, Any]]] = {
    "cost": {  # the step time of each extra forward (run with few --steps and --heldout)
        "default": {},
        "preserve": {"train.preserve": "base"},
        "prompt": {"train.preserve_prompt": ""},
        "both": {"train.preserve": "base", "train.preserve_prompt": ""},
        "pseudo_huber": {"train.loss": "pseudo_huber"},
    },
    "prompt": {
        "default": {},
        "blank": {"train.preserve_prompt": ""},
        "taught": {"train.preserve_prompt": "make the red circle blue"},
        "base_and_blank": {"train.preserve": "base", "train.preserve_prompt": ""},
    },
    "objective": {
        "default": {},
        "preserve": {"train.preserve": "base"},
        "preserve_w4": {"train.preserve": "base", "train.preserve_weight": 4.0},
        "huber": {"train.loss": "huber"},
        "pseudo_huber": {"train.loss": "pseudo_huber"},
        "logit_normal": {"train.timestep_sampling": "logit_normal"},
        "shift": {"train.timestep_sampling": "shift"},
        "resolution_shift": {"train.timestep_sampling": "resolution_shift"},
    },
    "sampler": {  # the candidate default sampler against the default, for runs at other seeds (--set=seed=N)
        "default": {},
        "shift": {"train.timestep_sampling": "shift"},
    },
    "control": {  # the toy's controls share their target's 64×64: a smaller control is what the world can show
        "default": {},
        "control_quarter": {"data.control_max_pixels": 32 * 32},
        "control_sixteenth": {"data.control_max_pixels": 16 * 16},
    },
    "route": {  # token routing (train.route: tread) at equal steps; s/step gives the equal-wall-time comparison
        "default": {},
        "tread_50": {"train.route": "tread", "train.route_ratio": 0.5, "train.route_blocks": [2, -2]},
        "tread_50_wide": {"train.route": "tread", "train.route_ratio": 0.5, "train.route_blocks": [1, -1]},
        "tread_75": {"train.route": "tread", "train.route_ratio": 0.75, "train.route_blocks": [1, -2]},
    },
    "route_seed": {  # the recommended routing at another seed (--set=seed=1), and without keeping the changed tokens
        "default": {},
        "tread": {"train.route": "tread"},
        "tread_keep_all": {"train.route": "tread", "train.route_keep_changed": False},
    },
    "route_time": {  # routed for the default's 300 steps' wall time: 356 steps at seed 1's 0.279 against 0.331 s/step
        "tread_equal_time": {"train.route": "tread", "train.max_train_steps": 356},
    },
}
"""``--rows``: named sets of rows, each a row's overrides on top of the defaults (and ``--set``)."""


def run_rows(table: str, names: list[str], root: Path, **kw: Any) -> None:
    """Every row of ``ROWS[table]`` on every edit, without the reference: a table of changed / unchanged PSNR,
    gain, unchanged drop and step time, then ``RESULT name=learning_<table> <row>_<edit>_<key>=…``."""
    if table not in ROWS:
        raise SystemExit(f"--rows takes one of {', '.join(ROWS)}; got {table!r}")
    extra, results = kw.pop("extra"), {}
    for row, overrides in ROWS[table].items():
        for edit in names:
            r = run_edit(edit, root / row, reference=False, extra={**extra, **overrides}, **kw)
            results[row, edit] = r
            print(f"{row}: {line(edit, r)}", flush=True)
    print("| row | " + " | ".join(f"{e} changed / unchanged (gain, drop)" for e in names) + " | s/step |")
    print("| --- |" + " --- |" * (len(names) + 1))
    for row in ROWS[table]:
        rs = [results[row, e] for e in names]
        cells = [f"{r['changed']:.2f} / {r['unchanged']:.2f} ({r['gain']:+.2f}, {r['unchanged_drop']:.2f})" for r in rs]
        s = statistics.median(r["s"] for r in rs)
        others = "".join(f" ({r['other_changed']:.2f} on the taught edit, drop {r['other_drop']:.2f})"
                         for r in rs if "other_changed" in r)  # fmt: skip
        print(f"| {row} | " + " | ".join(cells) + f" | {s:.3f} |{others}")
    keys = ("changed", "unchanged", "gain", "unchanged_drop", "s", "other_changed", "other_drop")
    fields = " ".join(f"{row}_{e}_{k}={r[k]:.3f}" for (row, e), r in results.items() for k in keys if k in r)
    print(f"RESULT name=learning_{table} {fields}")


def main(edits: str | tuple[str, ...] = "darken,grayscale", pairs: int = 64, heldout: int = 16, steps: int = 300,
         reference: bool = True, sample_steps: int = 28, out: str = "",
         set: str | dict[str, Any] = "", rows: str = "", other: str = "") -> None:  # fmt: skip
    """Run every edit and print its line, then the RESULT line (with ``rows``: every row of that table)."""
    names = edits.split(",") if isinstance(edits, str) else list(edits)
    extra = parse_set(set)
    if rows:
        with tempfile.TemporaryDirectory(prefix="qflux-learning-") as tmp:
            run_rows(rows, names, Path(out) if out else Path(tmp), pairs=pairs, heldout=heldout, steps=steps,
                     sample_steps=sample_steps, extra=extra, other=other)  # fmt: skip
        return
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="qflux-learning-") as tmp:
        root = Path(out) if out else Path(tmp)
        for edit in names:
            results[edit] = run_edit(edit, root, pairs=pairs, heldout=heldout, steps=steps, reference=reference,
                                     sample_steps=sample_steps, extra=extra)  # fmt: skip
            print(line(edit, results[edit]), flush=True)
    fields = " ".join(f"{e}_{k}={r[k]:.2f}" for e, r in results.items() for k in RESULT_KEYS if k in r)
    print(f"RESULT name=learning {fields} total_s={time.perf_counter() - started:.2f}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
