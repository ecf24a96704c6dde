"""What each ``model.quantize`` variant costs and saves: weight bytes, forward error, training losses.

    python benchmarks/precision.py [--steps=20] [--full-size]

On the tiny FLUX.1 Kontext model with its transformer 64 wide (CPU; at the default width of 32 most
linears have a shape bitsandbytes' 4-bit kernels cannot take everywhere and stay bf16), for none
(bf16), fp8, nf4 and fp4:

- ``bytes``: the frozen transformer's weight bytes (parameters, buffers and 4-bit statistics)
  against bf16, for the tiny model and for the ``small`` preset (width 256, where per-layer
  overheads such as fp8 row scales and bitsandbytes' 1 KiB code table weigh less);
- ``dfwd``: max |Δ| of one transformer forward against bf16 on the same inputs, relative to
  max |v_bf16| (and diffusers' layerwise fp8 casting, unscaled, for comparison);
- ``saved``: bytes autograd keeps from a LoRA forward to its backward beyond the model's stored
  tensors, against the bf16 weight bytes (layerwise casting keeps each layer's bf16 copy there;
  qflux's fp8 keeps its stored fp8 weight and scales, nothing new);
- ``loss``: the recipe's first ``--steps`` training losses from the same cached data and seed;
  the mean |Δ| against bf16 and the last-5 mean against the first-5 mean.

``--full-size`` (CUDA GPU): the real FLUX.1-Kontext transformer shape (19 double and 38 single
blocks, width 3072) with random weights in each variant, one LoRA step (rank 16, gradient
checkpointing) at 1024×1024 with a 1024×1024 control image: peak GPU memory and step time.

Ends with one line ``RESULT name=precision_tiny ...`` (or ``precision_full`` with ``--full-size``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ("none", "fp8", "nf4", "fp4")


def _bytes(path: Path) -> dict[str, float]:
    from qflux.models.flux_kontext.loaders import FLUX_KONTEXT
    from qflux.weights.loading import load_part
    from qflux.weights.quantize import weight_bytes

    sizes = {
        v: weight_bytes(load_part(FLUX_KONTEXT, path, "transformer", torch.bfloat16, quantize=v)) for v in VARIANTS
    }
    return {v: sizes[v] / sizes["none"] for v in VARIANTS} | {"bf16_bytes": float(sizes["none"])}


def _forward_errors(path: Path) -> dict[str, float]:
    from qflux.models.flux_kontext.loaders import FLUX_KONTEXT
    from qflux.models.flux_kontext.loss import velocity
    from qflux.weights.loading import load_part

    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    pooled, tokens = torch.randn(1, 32, generator=g), torch.randn(1, 8, 32, generator=g)

    def forward(tr: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return velocity(
                tr, {}, x, c, torch.tensor([0.6]), pooled, tokens, torch.tensor([2.5]), dtype=torch.bfloat16
            ).float()

    ref = forward(load_part(FLUX_KONTEXT, path, "transformer", torch.bfloat16))
    out = {}
    for v in VARIANTS[1:]:
        out[v] = float(
            (forward(load_part(FLUX_KONTEXT, path, "transformer", torch.bfloat16, quantize=v)) - ref).abs().max()
        )
    layerwise = load_part(FLUX_KONTEXT, path, "transformer", torch.bfloat16)
    layerwise.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    out["fp8_layerwise"] = float((forward(layerwise) - ref).abs().max())
    return {k: val / float(ref.abs().max()) for k, val in out.items()}


def _saved_for_backward(path: Path) -> dict[str, float]:
    """Bytes autograd keeps from one LoRA forward to its backward beyond the model's own stored
    tensors (unique storages: activations, and any weight copy made for the step), per variant and
    for diffusers' layerwise fp8 casting, as a fraction of the bf16 transformer's weight bytes."""
    from qflux.config.schema import LoraConfig
    from qflux.lora.adapter import inject_lora
    from qflux.models.flux_kontext.loaders import FLUX_KONTEXT
    from qflux.models.flux_kontext.loss import FluxKontextBatch, make_loss_fn
    from qflux.weights.loading import load_part
    from qflux.weights.quantize import weight_bytes

    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    batch = FluxKontextBatch(latents=r(1, 4, 16, 16), control_latents=r(1, 4, 16, 16), pooled=r(1, 32),
                             prompt_embeds=r(1, 8, 32), noise=r(1, 4, 16, 16), sigmas=torch.tensor([0.5]))  # fmt: skip

    def saved(tr: torch.nn.Module) -> int:
        lora = {k: v.requires_grad_() for k, v in inject_lora(tr, LoraConfig(r=4), seed=0).items()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            make_loss_fn(tr, guidance_scale=2.5)(lora, batch)
        own = {t.untyped_storage().data_ptr() for t in (*tr.parameters(), *tr.buffers())}
        return sum(n for ptr, n in seen.items() if ptr not in own)

    base = weight_bytes(load_part(FLUX_KONTEXT, path, "transformer", torch.bfloat16))
    out = {v: saved(load_part(FLUX_KONTEXT, path, "transformer", torch.bfloat16, quantize=v)) / base for v in VARIANTS}
    layerwise = load_part(FLUX_KONTEXT, path, "transformer", torch.bfloat16)
    layerwise.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    layerwise.compute_dtype = torch.bfloat16  # its first parameter reports fp8 (qflux.weights.dtypes.compute_dtype)
    out["fp8_layerwise"] = saved(layerwise) / base
    return out


def _losses(path: Path, steps: int, tmp: Path) -> dict[str, list[float]]:
    from qflux.config.parse import load_config
    from qflux.models.flux_kontext.config import FluxKontextConfig
    from recipes.flux_kontext_lora import train as run

    out = {}
    for v in VARIANTS:
        overrides = {
            "model.pretrained_model_name_or_path": str(path),
            "model.quantize": v,
            "model.max_sequence_length": 32,
            "train.max_train_steps": steps,
            "cache.use_cache": True,
            "cache.cache_dir": str(tmp / "cache"),
            "logging.output_dir": str(tmp / f"run-{v}"),
            "logging.write_sample": False,
            "logging.report_to": "none",
        }
        out[v] = run(load_config(FluxKontextConfig, None, overrides)).losses
    return out


WIDE = {"transformer": {"attention_head_dim": 32, "axes_dims_rope": (8, 12, 12)}}
"""The tiny model's transformer at width 64 (2 heads of 32), where the blocks' linears fit 4 bits."""


def run_tiny(steps: int) -> None:
    """Bytes, forward error and first losses of each variant on the tiny model (CPU)."""
    from qflux.models.flux_kontext.tiny import build_flux_kontext

    with tempfile.TemporaryDirectory(prefix="qflux-bench-precision-") as name:
        tmp = Path(name)
        path = build_flux_kontext(tmp / "tiny", seed=0, overrides=WIDE)
        sizes = _bytes(path)
        small = _bytes(build_flux_kontext(tmp / "small", seed=0, size="small"))
        errors = _forward_errors(path)
        kept = _saved_for_backward(path)
        losses = _losses(path, steps, tmp)
    parts = ["RESULT name=precision_tiny"]
    for v in VARIANTS:
        first, last = sum(losses[v][:5]) / 5, sum(losses[v][-5:]) / 5
        dloss = sum(abs(a - b) for a, b in zip(losses[v], losses["none"], strict=True)) / steps
        print(
            f"{v:5s} bytes {sizes[v]:.3f} (small preset {small[v]:.3f}) of bf16  forward max|Δ| "
            f"{errors.get(v, 0.0):.4f} of max|v|  kept for backward {kept[v]:.3f}  "
            f"loss first-5 {first:.4f} last-5 {last:.4f}  "
            f"mean|Δloss| vs bf16 {dloss:.5f}  first losses {[round(x, 4) for x in losses[v][:4]]}"
        )
        parts += [f"bytes_{v}={sizes[v]:.3f}", f"bytes_small_{v}={small[v]:.3f}", f"saved_{v}={kept[v]:.3f}"]
        parts.append(f"loss_drop_{v}={first - last:.4f}")
        if v != "none":
            parts += [f"dfwd_{v}={errors[v]:.4f}", f"dloss_{v}={dloss:.5f}"]
    print(
        f"fp8 by diffusers' layerwise casting (no scale): forward max|Δ| {errors['fp8_layerwise']:.4f} of max|v|, "
        f"kept for backward {kept['fp8_layerwise']:.3f}"
    )
    parts += [f"dfwd_fp8_layerwise={errors['fp8_layerwise']:.4f}", f"saved_fp8_layerwise={kept['fp8_layerwise']:.3f}"]
    print(" ".join(parts))


def run_full_size() -> None:
    """One LoRA step of the real-size transformer per variant on the GPU: peak memory and time."""
    from diffusers import FluxTransformer2DModel
    from train_step import FULL, _batch

    from qflux.config.schema import LoraConfig
    from qflux.lora.adapter import inject_lora
    from qflux.models.flux_kontext.loss import make_loss_fn
    from qflux.train.state import StepHParams, init_train_state, make_train_step
    from qflux.weights.quantize import quantize_frozen, weight_bytes

    device = torch.device("cuda")
    shape = {"latent": 128, "text": 512, "text_dim": 4096, "pooled": 768, "channels": 16}
    parts = [f"RESULT name=precision_full gpu={torch.cuda.get_device_name(device).replace(' ', '_')}"]
    for v in VARIANTS:
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        tr = FluxTransformer2DModel(**FULL)  # built on the CPU, quantized there, then moved
        torch.set_default_dtype(previous)
        tr.requires_grad_(False)
        quantize_frozen(tr, v)
        tr = tr.to(device)
        tr.enable_gradient_checkpointing()
        lora = inject_lora(tr, LoraConfig(r=16), seed=0)
        state = init_train_state({k: t.to(device) for k, t in lora.items()}, 0)
        step = make_train_step(
            make_loss_fn(tr, guidance_scale=2.5),
            StepHParams(engine="autograd"),
            module=tr,
        )
        batch = _batch(0, shape, device)
        lr = torch.tensor(1e-4, dtype=torch.float64)
        state, _ = step(state, [batch], lr)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        state, metrics = step(state, [batch], lr)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        wbytes = weight_bytes(tr) / 2**30
        loss = float(metrics["loss"])
        print(f"{v:5s} weights {wbytes:.2f} GiB  peak {peak:.2f} GiB  step {seconds:.3f} s  loss {loss:.4f}")
        parts += [f"weights_gib_{v}={wbytes:.2f}", f"peak_gib_{v}={peak:.2f}", f"step_s_{v}={seconds:.3f}"]
        del tr, state, step
        torch.cuda.empty_cache()
    print(" ".join(parts))


def main(steps: int = 20, full_size: bool = False) -> None:
    """``--full-size`` runs the real-size GPU measurement; otherwise the tiny CPU one."""
    if full_size:
        if not torch.cuda.is_available():
            raise SystemExit("--full-size needs a CUDA GPU (the real transformer in each variant)")
        run_full_size()
    else:
        run_tiny(steps)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
