"""FLUX.1 Kontext LoRA: ``python -m recipes.flux_kontext_lora [train|predict] [--config=F] [--a.b=c ...]``.

With no arguments it trains on the built-in default (a tiny random model and a synthetic
colour-inversion dataset) and writes, under ``logging.output_dir``: the LoRA
(``pytorch_lora_weights.safetensors``, diffusers format), ``config.yaml``, ``loss.png`` and
``sample.png`` (control | target | before | after).

The recipe is parse → build → loop → save; the maths lives in ``qflux``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml
from tqdm import tqdm

from qflux.builtin import resolve_dataset_path, resolve_model_path
from qflux.config import FluxKontextConfig
from qflux.config_parse import load_config, to_dict
from qflux.console import quiet_known_warnings
from qflux.data import batch_stream, load_rgb, scan_pairs
from qflux.errors import QfluxError
from qflux.flux_kontext.batch import build_batch
from qflux.flux_kontext.loaders import FluxKontextModels, load_flux_kontext, torch_dtype
from qflux.flux_kontext.predict import predict as kontext_predict
from qflux.flux_kontext.predict import to_pil
from qflux.flux_kontext.step import make_loss_fn
from qflux.lora import inject_lora, load_lora_file, save_lora
from qflux.plots import save_image_row, save_loss_curve
from qflux.schedules import learning_rate
from qflux.train_state import StepHParams, TrainState, init_train_state, train_step

LOG_EVERY = 10  # optimizer steps between progress-bar updates of the mean loss (the only host syncs)


@attrs.frozen(eq=False)
class RunResult:
    """What a finished training run hands back to an in-process caller (tests, notebooks)."""

    config: FluxKontextConfig
    state: TrainState
    initial_lora: dict[str, torch.Tensor]
    losses: list[float]
    models: FluxKontextModels
    lora_path: Path


def _pipeline_cls() -> Any:
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline


def run(cfg: FluxKontextConfig) -> RunResult:
    """Train a LoRA as configured and write the outputs; returns the final state and losses."""
    out = Path(cfg.logging.output_dir)
    samples = scan_pairs(resolve_dataset_path(cfg.data.dataset_path), cfg.data.max_pixels)
    models = load_flux_kontext(
        resolve_model_path(cfg.model.pretrained_model_name_or_path), torch_dtype(cfg.model.dtype)
    )
    transformer = models.transformer
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora0 = inject_lora(transformer, cfg.model.lora, seed=cfg.seed)
    state = init_train_state(lora0, cfg.seed)
    loss_fn = make_loss_fn(
        transformer, guidance_scale=cfg.train.guidance_scale, weighting_scheme=cfg.train.weighting_scheme
    )
    opt, tr, sch = cfg.optimizer, cfg.train, cfg.lr_scheduler
    hp = StepHParams(
        betas=opt.betas,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        max_grad_norm=tr.max_grad_norm,
        engine="autograd" if tr.gradient_checkpointing else "func",
    )
    stream = batch_stream(
        samples, cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle, num_workers=cfg.data.num_workers
    )
    losses: list[torch.Tensor] = []
    with tqdm(total=tr.max_train_steps, desc="train", unit="step") as bar:
        while state.step < tr.max_train_steps:
            micro = [
                build_batch(cfg, models, next(stream), (cfg.seed, state.step, m))
                for m in range(tr.gradient_accumulation_steps)
            ]
            lr = learning_rate(
                state.step,
                base_lr=opt.lr,
                kind=sch.scheduler_type,
                warmup_steps=sch.warmup_steps,
                total_steps=tr.max_train_steps,
                num_cycles=sch.num_cycles,
            )
            state, metrics = train_step(
                state, micro, loss_fn=loss_fn, lr=torch.tensor(lr, dtype=torch.float64), hp=hp, module=transformer
            )
            losses.append(metrics["loss"])
            bar.update(1)
            if state.step % LOG_EVERY == 0 or state.step == tr.max_train_steps:
                recent = torch.stack(losses[-LOG_EVERY:]).mean().item()
                bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr:.2e}")
    loss_values = torch.stack(losses).tolist()
    out.mkdir(parents=True, exist_ok=True)
    lora_path = save_lora(out, transformer, state.lora, dtype=torch_dtype(tr.save_dtype), pipeline_cls=_pipeline_cls())
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    save_loss_curve(loss_values, out / "loss.png")
    _write_sample(cfg, models, samples[0], state.lora, out / "sample.png")
    print(f"saved LoRA to {lora_path}; loss {loss_values[0]:.4f} → {loss_values[-1]:.4f}")
    return RunResult(cfg, state, lora0, loss_values, models, lora_path)


def _write_sample(cfg: FluxKontextConfig, models: FluxKontextModels, sample: Any, lora: Any, path: Path) -> None:
    """control | target | base model | with LoRA, same seed for both predictions."""
    control = load_rgb(sample.control)
    kw = {"seed": cfg.seed, "max_sequence_length": cfg.model.max_sequence_length}
    before = to_pil(kontext_predict(models, control, sample.prompt, **kw))
    after = to_pil(kontext_predict(models, control, sample.prompt, lora=lora, **kw))
    save_image_row([control, load_rgb(sample.target), before, after], ["control", "target", "before", "after"], path)


def train(config: str | None = None, **overrides: Any) -> None:
    """Train a LoRA: ``train [--config=recipes/configs/flux_kontext_bf16.yaml] [--section.key=value ...]``."""
    run(load_config(FluxKontextConfig, config, overrides))


def predict(
    image: str,
    prompt: str,
    out: str = "edited.png",
    lora: str | None = None,
    seed: int = 0,
    num_inference_steps: int = 28,
    guidance_scale: float = 2.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    true_cfg_scale: float = 1.0,
    config: str | None = None,
    **overrides: Any,
) -> None:
    """Edit one image: ``predict --image=IN.png --prompt="..." --out=OUT.png [--lora=FILE] [--model.*=...]``."""
    cfg = load_config(FluxKontextConfig, config, overrides)
    src = Path(image)
    if not src.is_file():
        raise QfluxError(f"input image '{src}' does not exist; pass --image=PATH")
    models = load_flux_kontext(
        resolve_model_path(cfg.model.pretrained_model_name_or_path), torch_dtype(cfg.model.dtype)
    )
    if lora is not None:
        load_lora_file(models.transformer, lora, pipeline_cls=_pipeline_cls())
    result = kontext_predict(
        models,
        load_rgb(src),
        prompt,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        negative_prompt=negative_prompt,
        true_cfg_scale=true_cfg_scale,
        max_sequence_length=cfg.model.max_sequence_length,
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    to_pil(result).save(out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: no arguments trains the built-in default; errors print one message and exit 2."""
    import fire

    quiet_known_warnings()
    args = sys.argv[1:] if argv is None else argv
    try:
        fire.Fire({"train": train, "predict": predict}, command=args or ["train"], name="flux_kontext_lora")
    except QfluxError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
