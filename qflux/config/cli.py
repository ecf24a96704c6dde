"""A recipe's command line: ``python -m recipes.<recipe> [train|cache|plan|check|predict] [--config=F] [--a.b=c ...]``.

fire parses the values; options alone (``--train.max_train_steps=10``) train; ``<command> --help``
(or ``-h``) prints the command's usage, examples and every config key with its default, generated
from the schema; a :class:`~qflux.config.errors.QfluxError` prints one line and exits 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fire

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config
from qflux.config.reference import command_help, function_options

HELP_FLAGS = ("--help", "-h")


def config_command(run: Callable[[Any], Any], config_cls: type) -> Callable[..., None]:
    """A command that reads ``--config`` and ``--section.key=value`` overrides into ``config_cls``
    and calls ``run`` with the config."""

    def command(config: str | None = None, **overrides: Any) -> None:
        run(load_config(config_cls, config, overrides))

    command.__doc__ = run.__doc__
    return command


def plan_command(run: Callable[..., int], config_cls: type) -> Callable[..., None]:
    """The ``plan`` command: the config as for ``train``, plus ``--vram=GiB``, ``--json`` and
    ``--controls=N``; exits with ``run``'s status (3: the run does not fit)."""

    def command(
        config: str | None = None, vram: float | None = None, json: bool = False, controls: int | None = None,
        **overrides: Any,
    ) -> None:  # fmt: skip
        status = run(load_config(config_cls, config, overrides), vram=vram, as_json=json, controls=controls)
        if status:
            raise SystemExit(status)

    command.__doc__ = run.__doc__
    return command


def _help(name: str, pipeline: str, config_cls: type, verb: str, predict: Callable[..., Any]) -> str:
    prog, stem = f"python -m recipes.{name}", name.removesuffix("_lora")
    # an example config the recipe ships (recipes/configs/<stem>_*.yaml), else a file of the user's
    shipped = sorted((Path(__file__).resolve().parents[2] / "recipes" / "configs").glob(f"{stem}_*.yaml"))
    config = f"--config=recipes/configs/{shipped[0].name}" if shipped else "--config=my_config.yaml"
    usage, summary, examples = {
        "train": (
            f"{prog} [train] [--config=FILE.yaml] [--section.key=value ...]",
            f"Train a {pipeline} LoRA on the (control, target, instruction) pairs of data.dataset_path. "
            "With no arguments: the built-in tiny model and synthetic dataset.",
            [prog, f"{prog} train {config} --data.dataset_path=my_pairs --logging.output_dir=outputs/my_lora",
             f"{prog} train {config} --resume_from_checkpoint=latest --train.max_train_steps=3000"],
        ),
        "cache": (
            f"{prog} cache [--config=FILE.yaml] [--section.key=value ...]",
            "Compute the encoders' outputs for the dataset once (content-keyed); train with --cache.use_cache=true "
            "then loads only the transformer.",
            [f"{prog} cache {config} --data.dataset_path=my_pairs",
             f"{prog} train {config} --data.dataset_path=my_pairs --cache.use_cache=true"],
        ),
        "plan": (
            f"{prog} plan [--config=FILE.yaml] [--section.key=value ...] --vram=GiB [--json] [--controls=N]",
            "Estimate the run's peak GPU memory without weights or a GPU (one step on fake tensors), with "
            "alternatives (storage × checkpointing × block swap); exit 0 if it fits, 3 if not, naming the "
            "cheapest change that fits. --controls: control images per sample (default: the most the model takes).",
            [f"{prog} plan {config} --vram=24", f"{prog} plan {config} --model.quantize=nf4 --vram=16 --json"],
        ),
        "check": (
            f"{prog} check [--config=FILE.yaml] [--data.dataset_path=DIR] [--section.key=value ...]",
            "Check a dataset before training: its errors (exit 2, as train gives them), then one warning per pair "
            "that will likely train badly (a target shifted or scaled against its control, identical to it, of "
            "another aspect; an instruction under 3 characters) and a summary; exit 0 with warnings only. train "
            "prints the same warnings at its start.",
            [f"{prog} check {config} --data.dataset_path=my_pairs"],
        ),
        "predict": (
            f"{prog} predict --image=IN.png --prompt=TEXT [--out=OUT.png] [--lora=FILE] [--section.key=value ...]",
            "Edit an image with the model (and a LoRA file in any format qflux writes or reads).",
            [f'{prog} predict --image=cat.png --prompt="make the cat wear a red hat" '
             "--lora=outputs/my_lora/pytorch_lora_weights.safetensors --out=edited.png"],
        ),
    }[verb]  # fmt: skip
    if verb == "predict":
        options = function_options(predict)
        return command_help(usage, summary, examples, config_cls, options=options, sections=("model", "devices"))
    return command_help(usage, summary, examples, config_cls)


def main(
    name: str,
    pipeline: str,
    config_cls: type,
    *,
    train: Callable[[Any], Any],
    cache: Callable[[Any], Any],
    predict: Callable[..., Any],
    plan: Callable[..., int],
    check: Callable[[Any], int],
    argv: list[str] | None,
) -> None:
    """Run a recipe's command line: ``train``, ``cache``, ``plan`` and ``check`` take the config read from
    ``--config`` and the overrides; ``predict`` takes its own options."""

    commands = {"train": config_command(train, config_cls), "cache": config_command(cache, config_cls),
                "plan": plan_command(plan, config_cls), "check": config_command(check, config_cls),
                "predict": predict}  # fmt: skip
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0].startswith("-") and args[0] not in HELP_FLAGS):
        args = ["train", *args]  # options alone train: `python -m recipes.<recipe> --train.max_train_steps=10`
    if args[0] in HELP_FLAGS or (args[0] in commands and any(a in HELP_FLAGS for a in args[1:])):
        verb = args[0] if args[0] in commands else "train"
        print(_help(name, pipeline, config_cls, verb, commands["predict"]))
        if args[0] in HELP_FLAGS:
            print(f"\ncommands: {', '.join(commands)} (`<command> --help` for each)")
        return
    try:
        fire.Fire(dict(commands), command=args, name=name)
    except QfluxError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
