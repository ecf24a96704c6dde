"""Step time and memory of qflux's train step, eager and compiled, against the diffusers reference loop.

    python benchmarks/train_step.py [--config=small|full] [--steps=10] [--warmup=2]
                                    [--dtypes=bfloat16,float32] [--compile=regional|full|none] [--fp8] [--profile=N]
                                    [--route=RATIO] [--route_blocks=FIRST,LAST]

On the same weights (shared tensors) and batches, interleaved after warm-up, it times:
  (a) qflux eager (the default on CPU): ``make_train_step`` on a transformer prepared as the recipe
      does it (``prepare_frozen_base``), autograd-engine gradients, the flat pure AdamW;
  (b) qflux compiled (skipped with ``--compile=none``): ``--compile=regional`` (the recipe's
      ``train.compile: regional``: compiled repeated blocks, autograd gradients) or ``--compile=full``
      (``train.compile: true``: the whole update as one graph, torch.func gradients);
  (c) the reference: the step of diffusers' ``train_dreambooth_lora_flux_kontext.py`` with a peft
      adapter: eager forward, loss, ``backward()``, ``clip_grad_norm_``, ``torch.optim.AdamW.step()``
      and ``zero_grad()``.
Frozen weights are in each ``--dtypes`` entry and LoRA parameters in float32, as in the diffusers
script; the first dtype is the headline (``speedup_vs_reference``), the others are reported with
their dtype as a prefix. Memory per variant: on CPU the peak RSS during its steps above the RSS
before them (freed heap memory is handed back with ``malloc_trim`` before each step), plus the
process's peak RSS (``peak_rss_mb``, shared by all variants); on GPU ``torch.cuda.max_memory_allocated``.
Ends with one line:

    RESULT name=train_step_<config> eager_s=… compiled_s=… reference_s=… speedup_vs_reference=… ...

``--config small`` (CPU): the "small" tiny preset (width 256, 2 double + 4 single blocks), 256×256
target and control images (32×32 latents), 128 text tokens, rank 16, batch 1.
``--config full`` (GPU): the FLUX.1-Kontext transformer's shape (19 double + 38 single blocks,
width 3072) with random weights, 1024×1024 target and control (128×128 latents), 512 text tokens,
rank 16, batch 1, gradient checkpointing on; adds MFU (model FLOPs counted by torch's
``FlopCounterMode`` on one forward, times 2 for the input-gradient backward; the frozen base takes
no weight gradient and recomputation is not counted) against the card's dense bf16 peak. ``--fp8``
adds (d): the compiled step with ``train.fp8_matmul``. ``--route=r`` adds the eager and compiled steps with
``train.route: tread`` at ratio r over ``--route_blocks`` (default 1,-1, the config's): the RESULT line's
``speedup_vs_reference`` is then the routed step's, ``unrouted_vs_reference`` the plain one's, and it carries
``route_ratio`` and ``route_blocks``. ``--profile=N`` then runs N more steps of the eager step and
of the reference under ``torch.profiler`` and prints where their time goes: each kind of op's share of the self CPU
(or CUDA) time (:data:`OP_KINDS`) and the top ops; the RESULT line gains ``profile_<variant>_<kind>_pct``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so the RSS before a step is
    the live memory only and the rise during it is that step's own working memory."""
    with contextlib.suppress(OSError):  # not glibc: no trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Samples this process's resident set size every millisecond while active (MB)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def __enter__(self) -> PeakRSS:
        self.start = self.now()
        self.peak = self.start
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def rise(self) -> float:
        return self.peak - self.start


# FLUX.1-Kontext-dev's transformer config (the real shape; weights are random here)
FULL = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
# dense bf16 tensor-core peaks (FLOP/s) by device-name fragment
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.5e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def _shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer tensor (frozen weights)."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def _batch(i: int, shape: dict[str, int], device: torch.device):
    from qflux.diffusion.flow import sigmas_from_u
    from qflux.models.flux_kontext.loss import FluxKontextBatch

    g = torch.Generator().manual_seed(i)
    lat, txt, dim, pooled = shape["latent"], shape["text"], shape["text_dim"], shape["pooled"]
    c = shape["channels"]

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(device)

    return FluxKontextBatch(
        latents=r(1, c, lat, lat),
        control_latents=r(1, c, lat, lat),
        pooled=r(1, pooled),
        prompt_embeds=r(1, txt, dim),
        noise=r(1, c, lat, lat),
        sigmas=sigmas_from_u(torch.rand(1, generator=g)).to(device),
        route=torch.rand((lat // 2) ** 2, generator=g).to(device),  # read by the routed variants only
    )


def _transformer(config: str, dtype: torch.dtype, device: torch.device, tmp: Path):
    from diffusers import FluxTransformer2DModel

    from qflux.models.flux_kontext.loaders import FLUX_KONTEXT
    from qflux.models.flux_kontext.tiny import build_flux_kontext
    from qflux.weights.loading import load_part

    if config == "small":
        path = build_flux_kontext(tmp / "model", seed=0, size="small")
        tr = load_part(FLUX_KONTEXT, path, "transformer", dtype).to(device)
        return tr, {"latent": 32, "text": 128, "text_dim": 512, "pooled": 256, "channels": 16}
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            tr = FluxTransformer2DModel(**FULL)
    finally:
        torch.set_default_dtype(previous)
    tr.requires_grad_(False).eval()
    return tr, {"latent": 128, "text": 512, "text_dim": 4096, "pooled": 768, "channels": 16}


def _forward_flops(tr, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from qflux.models.flux_kontext.loss import make_loss_fn

    loss_fn = make_loss_fn(tr, guidance_scale=1.0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss_fn({}, batch)
    return float(counter.get_total_flops())


OP_KINDS = {
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int", "aten::mkldnn_"),
    "attention": ("scaled_dot_product", "attention", "aten::_softmax", "aten::softmax"),
    "copy_cast": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::to", "aten::cat",
                  "aten::stack", "aten::fill_", "aten::zero_", "aten::empty", "aten::index"),
    "norm": ("layer_norm", "rms_norm", "group_norm", "aten::rsqrt", "aten::var", "aten::mean", "aten::pow"),
    "optimizer": ("_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt"),
}  # fmt: skip
"""Kinds of op by name prefix or part (first match wins); everything else (elementwise, rope, views) is "other"."""


def op_kind(name: str) -> str:
    """The :data:`OP_KINDS` kind of a profiler op name, or "other"."""
    return next((kind for kind, parts in OP_KINDS.items() if any(p in name for p in parts)), "other")


def profile_step(fn, batches, device: torch.device, label: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Self time per op kind (percent of the total) over ``batches``, and the top ops printed."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for b in batches:
            fn(b)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr)) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    shares: dict[str, float] = {}
    for name, t in events:
        shares[op_kind(name)] = shares.get(op_kind(name), 0.0) + 100.0 * t / total
    print(f"profile {label}: " + ", ".join(f"{k} {v:.1f}%" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
    for name, t in sorted(events, key=lambda e: -e[1])[:8]:
        print(f"    {100.0 * t / total:5.1f}%  {name}  ({op_kind(name)})")
    return shares


def bench_dtype(
    config: str,
    dtype_name: str,
    steps: int,
    warmup: int,
    compile: str,
    fp8: bool,
    device: torch.device,
    profile: int = 0,
    route: float = 0.0,
    route_blocks: tuple[int, int] = (1, -1),
) -> dict[str, float]:
    """Time and measure every variant for one frozen-weight dtype; returns the figures."""
    import tempfile

    import attrs

    from qflux.config.schema import LoraConfig
    from qflux.diffusion.routing import install_routing
    from qflux.lora.adapter import inject_lora
    from qflux.models.flux_kontext.loss import make_loss_fn
    from qflux.optim.transform import make_optimizer
    from qflux.train.state import StepHParams, grad_engine, init_train_state, make_train_step
    from qflux.weights.block_swap import transformer_blocks
    from qflux.weights.dtypes import torch_dtype
    from qflux.weights.frozen_linear import prepare_frozen_base

    dtype = torch_dtype(dtype_name)
    checkpointing = config == "full"
    with tempfile.TemporaryDirectory(prefix="qflux-bench-step-") as tmp:
        base, shape = _transformer(config, dtype, device, Path(tmp))
    lora_cfg = LoraConfig(r=16, lora_alpha=16)
    hp_args = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4, max_grad_norm=1.0)
    lr = torch.tensor(1e-4, dtype=torch.float64, device=device)
    variants: dict[str, object] = {}

    # (c) the reference: peft adapter trainable in its own module tree, torch.optim.AdamW
    ref_tr = _shared_copy(base)
    if checkpointing:
        ref_tr.enable_gradient_checkpointing()
    lora = inject_lora(ref_tr, lora_cfg, seed=0)
    ref_params = []
    for name, p in ref_tr.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            ref_params.append(p)
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)

    def qflux_step(mode: str, fp8_matmul: bool = False, ratio: float = 0.0):
        tr = _shared_copy(base)
        if checkpointing:
            tr.enable_gradient_checkpointing()
        inject_lora(tr, lora_cfg, seed=0)
        if ratio:  # as train.route: tread sets it up
            install_routing(transformer_blocks(tr), route_blocks, ratio)
        prepare_frozen_base(tr, fp8_matmul=fp8_matmul, device=device, compile_mode=mode)
        engine = grad_engine(mode)
        loss_fn = make_loss_fn(tr, guidance_scale=1.0)
        step = make_train_step(loss_fn, StepHParams(make_optimizer(**hp_args), engine=engine), module=tr, compile=mode)
        holder = {"state": init_train_state({k: v.to(device) for k, v in lora.items()}, seed=0)}

        def run(b) -> None:
            holder["state"], _ = step(holder["state"], [b if ratio else attrs.evolve(b, route=None)], lr)

        return run

    variants["eager"] = qflux_step("none")
    if compile != "none":
        variants["compiled"] = qflux_step(compile)
    if fp8:
        variants["compiled_fp8"] = qflux_step(compile, fp8_matmul=True)
    if route:
        variants["eager_routed"] = qflux_step("none", ratio=route)
        if compile != "none":
            variants["compiled_routed"] = qflux_step(compile, ratio=route)
    variants["reference"] = lambda b: _reference_step(ref_tr, ref_params, ref_opt, b, 1.0, 1.0)

    t0 = time.perf_counter()
    for i in range(warmup):
        for fn in variants.values():
            fn(_batch(i, shape, device))
    warm_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in variants}
    mem: dict[str, float] = {k: 0.0 for k in variants}
    peak_rss = 0.0  # the process's own peak RSS over the timed steps (all variants share one process)
    for i in range(warmup, warmup + steps):
        b = _batch(i, shape, device)
        order = list(variants.items())
        for name, fn in order if i % 2 == 0 else order[::-1]:  # alternate who goes first: no order bias
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                fn(b)
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
                mem[name] = max(mem[name], torch.cuda.max_memory_allocated() / 2**30)
            else:
                _trim()
                with PeakRSS() as rss:
                    t = time.perf_counter()
                    fn(b)
                    times[name].append(time.perf_counter() - t)
                mem[name] = max(mem[name], rss.rise)
                peak_rss = max(peak_rss, rss.peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    profiled = {}
    profiled_names = [k for k in ("eager", "eager_routed", "compiled_routed", "reference") if k in variants]
    for name in profiled_names if profile else ():
        batches = [_batch(warmup + steps + i, shape, device) for i in range(profile)]
        profiled[name] = profile_step(variants[name], batches, device, f"{dtype_name} {name}")
    unit = "GB" if device.type == "cuda" else "MB (rise)"
    for k in variants:
        print(f"{dtype_name:9s} {k:13s} median {med[k]:.4f} s/step  peak {mem[k]:.2f} {unit}", flush=True)
    print(f"{dtype_name}: warm-up (compile included) {warm_s:.1f} s", flush=True)
    out = {f"{k}_s": med[k] for k in variants}
    out.update({f"{'gb' if device.type == 'cuda' else 'mb'}_{k}": mem[k] for k in variants})
    if device.type == "cpu":
        out["peak_rss_mb"] = peak_rss
    best = "compiled" if "compiled" in med else "eager"
    out["eager_vs_reference"] = med["reference"] / med["eager"]  # the default path on CPU (compile: auto)
    if route:  # the headline is the routed step; the unrouted one stays beside it
        out["unrouted_vs_reference"] = med["reference"] / med[best]
        best += "_routed"
        out["route_ratio"] = route
    out["speedup_vs_reference"] = med["reference"] / med[best]
    if "compiled" in med:
        out["compiled_vs_eager"] = med["eager"] / med["compiled"]
    out["mem_vs_reference"] = mem[best] / max(mem["reference"], 1e-9)
    out["warmup_s"] = warm_s
    for name, shares in profiled.items():
        out |= {f"profile_{name}_{kind}_pct": pct for kind, pct in shares.items()}
    if config == "full":
        flops = 2 * _forward_flops(base, _batch(0, shape, device))
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        for k in variants:
            out[f"tflops_{k}"] = flops / med[k] / 1e12
            if peak:
                out[f"mfu_{k}"] = flops / med[k] / peak
    return out


def main(
    config: str = "small",
    steps: int = 10,
    warmup: int = 2,
    dtypes: str | tuple[str, ...] = "bfloat16,float32",
    compile: str = "regional",
    fp8: bool = False,
    profile: int = 0,
    route: float = 0.0,
    route_blocks: str | tuple[int, int] = "1,-1",
) -> None:
    """Run every dtype, print the per-variant figures and one RESULT line."""
    if config not in ("small", "full"):
        raise SystemExit("--config is small (CPU) or full (GPU)")
    if config == "full" and not torch.cuda.is_available():
        raise SystemExit("--config=full needs a CUDA GPU (the real transformer shape); use --config=small on CPU")
    device = torch.device("cuda" if config == "full" else "cpu")
    names = dtypes.split(",") if isinstance(dtypes, str) else list(dtypes)
    started = time.perf_counter()
    parts = [f"name=train_step_{config}", f"compile={compile}"]
    if route:
        parts.append(
            f"route_blocks={route_blocks if isinstance(route_blocks, str) else ','.join(map(str, route_blocks))}"
        )
    for i, name in enumerate(names):
        span = tuple(int(i) for i in route_blocks.split(",")) if isinstance(route_blocks, str) else route_blocks
        figures = bench_dtype(config, name, steps, warmup, compile, fp8, device, profile, route, span)  # type: ignore[arg-type]
        prefix = "" if i == 0 else f"{name}_"
        parts += [f"{prefix}{k}={v:.4f}" if k.endswith("_s") or "vs" in k else f"{prefix}{k}={v:.3f}"
                  for k, v in figures.items()]  # fmt: skip
        if i == 0:
            parts.insert(2, f"dtype={name}")
    parts.append(f"total_s={time.perf_counter() - started:.0f}")
    print("RESULT " + " ".join(parts))


def _reference_step(
    transformer, params, opt, batch, guidance_scale: float, max_grad_norm: float, unmasked_weight: float = 1.0
) -> float:
    """One step as diffusers' train_dreambooth_lora_flux_kontext.py does it (module holds the LoRA); where the
    batch carries a change mask (``train.loss_mask``), its loss is the pixel-weighted mean qflux documents."""
    from diffusers import FluxKontextPipeline

    x0, noise, cond = batch.latents, batch.noise, batch.control_latents
    dtype = transformer.dtype
    bsz, c, h, w = x0.shape
    sigmas = batch.sigmas.view(-1, 1, 1, 1)
    ids = FluxKontextPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, "cpu", dtype)
    cond_ids = FluxKontextPipeline._prepare_latent_image_ids(bsz, cond.shape[2] // 2, cond.shape[3] // 2, "cpu", dtype)
    cond_ids[..., 0] = 1
    noisy = ((1.0 - sigmas) * x0 + sigmas * noise).to(dtype)
    packed = FluxKontextPipeline._pack_latents(noisy, bsz, c, h, w)
    n = packed.shape[1]
    packed = torch.cat(
        [packed, FluxKontextPipeline._pack_latents(cond.to(dtype), bsz, c, cond.shape[2], cond.shape[3])], 1
    )
    pred = transformer(
        hidden_states=packed,
        timestep=batch.sigmas.to(dtype),
        guidance=torch.tensor([guidance_scale]).expand(bsz),
        pooled_projections=batch.pooled.to(dtype),
        encoder_hidden_states=batch.prompt_embeds.to(dtype),
        txt_ids=torch.zeros(batch.prompt_embeds.shape[1], 3, dtype=dtype),
        img_ids=torch.cat([ids, cond_ids], 0),
        return_dict=False,
    )[0][:, :n]
    pred = FluxKontextPipeline._unpack_latents(pred, h * 8, w * 8, 8)
    target = noise - x0
    err = (pred.float() - target.float()) ** 2
    if batch.change is None:
        loss = torch.mean(err.reshape(bsz, -1), 1).mean()
    else:  # train.loss_mask (not in the diffusers script): per sample Σ p·e / Σ p, p = u + (1 − u)·mask
        p = (unmasked_weight + (1.0 - unmasked_weight) * batch.change.float()).expand_as(err)
        loss = ((p * err).reshape(bsz, -1).sum(1) / p.reshape(bsz, -1).sum(1)).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


if __name__ == "__main__":
    import fire

    fire.Fire(main)
