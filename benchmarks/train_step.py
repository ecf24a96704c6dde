"""Step time of qflux's train step, eager and compiled, against the diffusers reference loop.

    python benchmarks/train_step.py [--config=small] [--steps=4] [--warmup=1] [--dtype=bfloat16]

On the same weights and batches, interleaved after warm-up, it times:
  (a) qflux eager: ``make_train_step`` (torch.func gradients, pure AdamW);
  (b) qflux compiled: the same step under ``torch.compile(fullgraph=True)``;
  (c) the reference: the step of diffusers' ``train_dreambooth_lora_flux_kontext.py`` with a peft
      adapter: eager forward, loss, ``backward()``, ``clip_grad_norm_``, ``torch.optim.AdamW.step()``
      and ``zero_grad()``.
Frozen weights are in ``--dtype`` and LoRA parameters in float32, as in the diffusers script. The
peak RSS of each variant is sampled while it runs (the process baseline is shared). Ends with:

    RESULT name=train_step_<config>_<dtype> eager_s=… compiled_s=… reference_s=… speedup_vs_reference=… ...

``--config small``: the "small" tiny preset (width 256, 2 double + 4 single blocks), 256×256 target and
control images (32×32 latents), 128 text tokens, rank 16, batch 1.
"""

from __future__ import annotations

import copy
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def _reference_step(transformer, params, opt, batch, guidance_scale: float, max_grad_norm: float) -> float:
    """One step as diffusers' train_dreambooth_lora_flux_kontext.py does it (module holds the LoRA)."""
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
    loss = torch.mean(((pred.float() - target.float()) ** 2).reshape(bsz, -1), 1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def main(config: str = "small", steps: int = 4, dtype: str = "bfloat16", warmup: int = 1) -> None:
    """Build the model and batches, warm up (compile), then time the three variants interleaved."""
    import tempfile

    from qflux.config import LoraConfig
    from qflux.flow import sigmas_from_u
    from qflux.flux_kontext.loaders import load_flux_kontext_transformer, torch_dtype
    from qflux.flux_kontext.step import FluxKontextBatch, make_loss_fn
    from qflux.lora import inject_lora
    from qflux.tiny import build_flux_kontext
    from qflux.train_state import StepHParams, init_train_state, make_train_step

    if config != "small":
        raise SystemExit("only --config=small runs on CPU; --config=full needs the GPU (not implemented yet)")
    wdtype = torch_dtype(dtype)
    with tempfile.TemporaryDirectory(prefix="qflux-bench-step-") as tmp:
        path = build_flux_kontext(Path(tmp) / "model", seed=0, size="small")
        tr = load_flux_kontext_transformer(path, wdtype)
    ref_tr = copy.deepcopy(tr)
    lora_cfg = LoraConfig(r=16, lora_alpha=16)
    lora = inject_lora(tr, lora_cfg, seed=0)
    # the reference: the same adapter, trainable in the module, LoRA params in float32
    inject_lora(ref_tr, lora_cfg, seed=0)
    ref_tr.load_state_dict(lora, strict=False)
    ref_params = []
    for name, p in ref_tr.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            ref_params.append(p)
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)

    def batch(i: int) -> FluxKontextBatch:
        g = torch.Generator().manual_seed(i)
        return FluxKontextBatch(
            latents=torch.randn(1, 16, 32, 32, generator=g),
            control_latents=torch.randn(1, 16, 32, 32, generator=g),
            pooled=torch.randn(1, 256, generator=g),
            prompt_embeds=torch.randn(1, 128, 512, generator=g),
            noise=torch.randn(1, 16, 32, 32, generator=g),
            sigmas=sigmas_from_u(torch.rand(1, generator=g)),
        )

    loss_fn = make_loss_fn(tr, guidance_scale=1.0, weighting_scheme="none")
    hp = StepHParams(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4, max_grad_norm=1.0)
    eager = make_train_step(loss_fn, hp)
    compiled = make_train_step(loss_fn, hp, compile=True)
    lr = torch.tensor(1e-4, dtype=torch.float64)
    s_eager = s_comp = init_train_state(lora, seed=0)
    t0 = time.perf_counter()
    for i in range(warmup):
        s_comp, _ = compiled(s_comp, [batch(i)], lr)
        s_eager, _ = eager(s_eager, [batch(i)], lr)
        _reference_step(ref_tr, ref_params, ref_opt, batch(i), 1.0, 1.0)
    warm_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"eager": [], "compiled": [], "reference": []}
    peaks: dict[str, float] = {}
    rss = {k: PeakRSS() for k in times}
    for i in range(warmup, warmup + steps):
        b = batch(i)
        for name in times:
            with rss[name]:
                t = time.perf_counter()
                if name == "eager":
                    s_eager, _ = eager(s_eager, [b], lr)
                elif name == "compiled":
                    s_comp, _ = compiled(s_comp, [b], lr)
                else:
                    _reference_step(ref_tr, ref_params, ref_opt, b, 1.0, 1.0)
                times[name].append(time.perf_counter() - t)
    peaks = {k: r.peak for k, r in rss.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in times:
        print(f"{k:10s} median {med[k]:.4f} s/step  peak RSS {peaks[k]:.0f} MB")
    print(f"warm-up (compile included): {warm_s:.1f} s")
    print(
        f"RESULT name=train_step_{config}_{dtype} eager_s={med['eager']:.4f} compiled_s={med['compiled']:.4f} "
        f"reference_s={med['reference']:.4f} speedup_vs_reference={med['reference'] / med['compiled']:.3f} "
        f"compiled_vs_eager={med['eager'] / med['compiled']:.3f} rss_mb_compiled={peaks['compiled']:.0f} "
        f"rss_mb_reference={peaks['reference']:.0f} warmup_s={warm_s:.1f}"
    )


if __name__ == "__main__":
    import fire

    fire.Fire(main)
