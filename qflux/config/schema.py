"""The configuration schema of the LoRA recipes: one root shared by every model, plus its model section.

:class:`RecipeConfig` holds the sections every model reads (data, optimizer, schedule, the
training loop, logging, cache, devices, validation); a model's own keys live in its ``model``
section (qflux/models/<family>/config.py) and its ``devices`` section names its components; the data and
adapter sections live in :mod:`qflux.config.data` and :mod:`qflux.config.lora`. Defaults live with each section
and nowhere else. They describe the built-in demo run (a tiny model
and the synthetic dataset), so ``python -m recipes.flux_kontext_lora`` and ``python -m
recipes.qwen_image_edit_lora`` work with no arguments; the YAML files in ``recipes/configs/`` set
the values for the real models. Every key is read by the code.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import attrs
from attrs import validators as v

from qflux.config.data import DataConfig
from qflux.config.lora import LoraConfig
from qflux.config.validators import (
    device_field,
    non_negative,
    positive,
    positive_or_none,
    read_only_when,
    unit_interval,
)

Dtype = Literal["bfloat16", "float16", "float32"]
DTYPES = ("bfloat16", "float16", "float32")


@attrs.frozen
class ModelSection:
    """Which model to load and how (the keys every model has)."""

    recipe: ClassVar[str] = "lora"
    """The recipe's name: ``logging.output_dir`` defaults to ``outputs/<recipe>``."""
    pretrained_model_name_or_path: str
    """Local diffusers folder or hub id (each model section sets its built-in default)."""

    dtype: Dtype = attrs.field(default="bfloat16", validator=v.in_(DTYPES))
    """dtype of the frozen weights for train, cache and predict. LoRA weights train in float32."""
    quantize: Literal["none", "fp8", "nf4", "fp4"] = attrs.field(
        default="none", validator=v.in_(("none", "fp8", "nf4", "fp4"))
    )
    """Store the frozen transformer's linear weights in fewer bits, quantized on load from any
    checkpoint (or read as they are from a pre-quantized one): 'fp8' (float8_e4m3fn with a scale per
    output channel, computed in bf16; pip install 'qflux[fp8]'), 'nf4' / 'fp4' (bitsandbytes 4-bit,
    blocks of 64; pip install 'qflux[4bit]'). The LoRA stays fp32 and saves in the same format
    (docs/flux_kontext_configuration_guide.md)."""
    transformer_file: str | None = None
    """A single file that replaces the folder's transformer weights, the folder still giving its config and every
    other component: .safetensors in diffusers names or the original BFL / Qwen ones (diffusers' ``from_single_file``
    converts them; an fp8 e4m3fn file, plain or fp8-scaled, stays fp8), or .gguf (kept quantized;
    pip install 'qflux[gguf]'). null: the folder's own transformer."""
    quantize_text_encoders: bool = False
    """Also store the text encoders' linear weights as model.quantize says, wherever they load:
    the cache command, training without the cache, and predict."""
    lora: LoraConfig = attrs.field(factory=LoraConfig)


@attrs.frozen
class OptimizerConfig:
    """The optimizer: AdamW (decoupled weight decay, as ``torch.optim.AdamW``) or Prodigy."""

    name: Literal["adamw", "prodigy"] = attrs.field(default="adamw", validator=v.in_(("adamw", "prodigy")))
    """'adamw', or 'prodigy' (Adam that estimates its own step size d; lr multiplies d, so 1.0 is
    the usual value; ``prodigyopt``'s algorithm, qflux.optim.prodigy)."""
    lr: float | None = attrs.field(default=None, validator=v.optional(positive))
    """Peak learning rate (the schedule scales it per step). null: 1e-3 with adamw, which suits the
    toy and tiny defaults (real FLUX.1 Kontext LoRAs train at about 1e-4), and 1.0 with prodigy."""
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), converter=tuple)
    """(β1, β2): decay of the gradient's running mean and of its running square."""
    weight_decay: float = attrs.field(default=0.01, validator=non_negative)
    """Decoupled weight decay λ: p ← p·(1 − lr·λ) each step (Prodigy: p ← p·(1 − d·lr·λ))."""
    eps: float = attrs.field(default=1e-8, validator=positive)
    """ε added to √v in the denominator (Prodigy: d·ε)."""
    d0: float = attrs.field(default=1e-6, validator=positive)
    """prodigy only: the initial estimate of d."""
    d_coef: float = attrs.field(default=1.0, validator=positive)
    """prodigy only: multiplier of the estimate (below 1 for smaller steps)."""
    use_bias_correction: bool = False
    """prodigy only: fold Adam's bias correction into the step size."""
    safeguard_warmup: bool = False
    """prodigy only: keep the lr schedule out of the estimate's denominator (recommended with
    lr_scheduler.warmup_steps)."""

    @betas.validator
    def _check_betas(self, att: Any, value: tuple[float, ...]) -> None:
        if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"betas must be two numbers in [0, 1), got {value!r}")

    def __attrs_post_init__(self) -> None:
        read_only_when(
            self, "optimizer", {k: (self.name == "prodigy", "optimizer.name: prodigy") for k in PRODIGY_KEYS}
        )

    @property
    def peak_lr(self) -> float:
        """``lr``, or the optimizer's default when it is null (1e-3 AdamW, 1.0 Prodigy)."""
        if self.lr is not None:
            return self.lr
        return 1.0 if self.name == "prodigy" else 1e-3


PRODIGY_KEYS = ("d0", "d_coef", "use_bias_correction", "safeguard_warmup")
"""The optimizer keys only Prodigy reads."""


@attrs.frozen
class LrSchedulerConfig:
    """Learning-rate schedule: lr(step) = lr · warmup(step) · decay(step)."""

    scheduler_type: Literal["constant", "linear", "cosine"] = attrs.field(
        default="constant", validator=v.in_(("constant", "linear", "cosine"))
    )
    """Decay after warmup: none, linear to 0, or cosine to 0 (diffusers' get_scheduler)."""
    warmup_steps: int = attrs.field(default=0, validator=non_negative)
    """Linear warmup from 0 over this many optimizer steps."""
    num_cycles: float = attrs.field(default=0.5, validator=positive)
    """Cosine only: number of half-periods over the decay (0.5 decays once to 0)."""


@attrs.frozen
class TrainConfig:
    """The optimisation loop and the flow-matching objective."""

    max_train_steps: int = attrs.field(default=150, validator=[v.instance_of(int), positive])
    """Training stops after exactly this many optimizer steps."""
    gradient_accumulation_steps: int = attrs.field(default=1, validator=positive)
    """Micro-batches averaged into one optimizer step."""
    max_grad_norm: float | None = attrs.field(default=1.0, validator=positive_or_none)
    """Clip the global L2 norm of the LoRA gradient to this value; null disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute transformer blocks in backward to save memory (uses the autograd engine)."""
    blocks_to_swap: int = attrs.field(default=0, validator=[v.instance_of(int), non_negative])
    """Keep the frozen weights of this many transformer blocks (the last ones) in pinned host memory;
    each layer's weight visits the device only while it is used, the next block prefetched on a side
    stream (musubi-tuner's block swap). Same LoRA as without; slower by the copies. Not with 4-bit
    quantize, fp8_matmul, compile or fsdp (``auto`` compile turns eager). ``plan`` shows what it saves."""
    compile: bool | Literal["auto", "regional"] = attrs.field(
        default="auto", validator=v.in_((True, False, "auto", "regional"))
    )
    """How the hot step is compiled with torch.compile. ``true``: the whole update (gradients,
    clipping, AdamW) as one graph (torch.func; not with gradient_checkpointing). ``regional``: each
    repeated transformer block (diffusers' ``compile_repeated_blocks``) under the autograd engine;
    works with gradient_checkpointing and compiles in about half the time. ``false``: eager.
    ``auto``: regional on CUDA, eager on CPU, where a 150-step run does not earn back the cold
    compile (see benchmarks/README.md)."""
    lora_format: Literal["diffusers", "comfyui", "both"] = attrs.field(
        default="both", validator=v.in_(("diffusers", "comfyui", "both"))
    )
    """Format of the final LoRA: pytorch_lora_weights.safetensors (diffusers) and/or
    pytorch_lora_weights_comfyui.safetensors (ComfyUI's native diffusion_model.* keys with .alpha).
    Checkpoints always hold the diffusers file."""
    distributed: Literal["ddp", "fsdp"] = attrs.field(default="ddp", validator=v.in_(("ddp", "fsdp")))
    """Engine under torchrun with several ranks (ignored by one process). ``ddp``: every rank holds
    the frozen base, LoRA gradients are all-reduced. ``fsdp``: FSDP2 also shards the frozen base
    per transformer block, so a model too big for one device trains on several (docs/distributed.md)."""
    fp8_matmul: bool = False
    """Run the frozen base's large matmuls in fp8 (static per-channel weight scales, dynamic
    per-token activation scales; torchao). CUDA with compute capability 8.9+ only; the LoRA stays fp32."""
    weighting_scheme: Literal["none", "cosmap", "sigma_sqrt"] = attrs.field(
        default="none", validator=v.in_(("none", "cosmap", "sigma_sqrt"))
    )
    """The loss weight w(σ) of each sample (SD3 paper, diffusers' ``compute_loss_weighting_for_sd3``): 'none'
    1, 'cosmap' 2/(π(1 − 2σ + 2σ²)), 'sigma_sqrt' σ⁻². How σ is drawn is ``timestep_sampling``."""
    timestep_sampling: Literal["uniform", "logit_normal", "mode", "shift", "resolution_shift"] = attrs.field(
        default="uniform", validator=v.in_(("uniform", "logit_normal", "mode", "shift", "resolution_shift"))
    )
    """How each sample's σ is drawn (from the step's keyed generator, the same on 1 or N ranks): 'uniform'
    u ~ U[0, 1); 'logit_normal' u = sigmoid(N(logit_mean, logit_std)) (SD3; musubi-tuner's and ai-toolkit's
    'sigmoid' with scale s is logit_std s); 'mode' SD3's mode density (mode_scale); then σ = 1 − u on the
    scheduler's 1000 training steps (diffusers' mapping). 'shift': logit_normal, then σ' = s·σ / (1 + (s − 1)·σ) with
    s = timestep_shift (towards noise for s > 1); 'resolution_shift': logit_normal, then the shift of the
    family's own pipeline at the target's size, σ' = e^μ / (e^μ + 1/σ − 1), μ from its token count as the
    pipeline computes it (FLUX.1 and Qwen from the scheduler config, FLUX.2 its empirical μ at 50 steps)."""
    logit_mean: float = 0.0
    """logit_normal, shift and resolution_shift: mean of the normal before the sigmoid. σ = 1 − u on the
    scheduler's steps, as diffusers' scripts map it, so a positive mean draws σ nearer the image."""
    logit_std: float = attrs.field(default=1.0, validator=positive)
    """logit_normal, shift and resolution_shift: standard deviation of the normal before the sigmoid."""
    mode_scale: float = 1.29
    """mode: scale of the mode-favouring density."""
    timestep_shift: float = attrs.field(default=3.0, validator=positive)
    """shift: s of σ' = s·σ / (1 + (s − 1)·σ) (SD3 trains at 3.0; 1 changes nothing)."""
    loss_mask: Literal["none", "masks", "auto"] = attrs.field(
        default="none", validator=v.in_(("none", "masks", "auto"))
    )
    """Weight the loss by where the edit happens. ``masks``: ``masks/NAME.png`` beside
    control_images/ (grey, white where the edit is, the target's size; a pair without one weighs
    all alike). ``auto``: a soft mask from |target − first control|, smoothed and dilated on the
    latent grid. Masks follow buckets and crops; the cache stores them (``change_mask`` entries)."""
    loss: Literal["mse", "huber", "pseudo_huber"] = attrs.field(
        default="mse", validator=v.in_(("mse", "huber", "pseudo_huber"))
    )
    """The error ℓ(d) of each element of d = v̂ − v: 'mse' d²; 'huber' d² up to |d| = huber_c, then
    2·huber_c·|d| − huber_c²; 'pseudo_huber' 2c²(√(1 + (d/c)²) − 1) with c = huber_c (diffusers'
    and SimpleTuner's "huber"). Both huber kinds equal mse for errors well below huber_c and grow
    linearly above it, so rare large errors pull less (docs/what_options_do.md)."""
    huber_c: float = attrs.field(default=0.1, validator=positive)
    """huber and pseudo_huber only: the error size c where ℓ turns from quadratic to linear."""
    preserve: Literal["none", "base"] = attrs.field(default="none", validator=v.in_(("none", "base")))
    """'base': keep what the edit does not touch as the base model has it. Outside the change mask m
    (``loss_mask``: masks or auto) the LoRA's velocity is also pulled to the base model's own
    prediction on the same noisy latents, computed in the same step with the adapter off:
    loss += mean w(σ)·preserve_weight·(1 − m)·ℓ(v̂ − v̂_base). Costs one more transformer forward
    (no backward) a step; ``plan`` counts it."""
    preserve_prompt: str | None = None
    """Differential output preservation: on each step's noisy latents and controls, the LoRA's velocity for
    this prompt is pulled to the base model's, loss += mean w(σ)·preserve_weight·ℓ(v̂_P − v̂_base,P)
    (ai-toolkit's DOP on a prompt of your choosing; "" is its blank-prompt preservation). Two more
    transformer forwards a step (one with backward); the cache holds its embedding. null: off."""
    preserve_weight: float = attrs.field(default=1.0, validator=non_negative)
    """λ of the preservation terms (``preserve: base``, ``preserve_prompt``)."""
    ema_decay: float | None = attrs.field(default=None, validator=v.optional(unit_interval))
    """Keep an exponential moving average of the LoRA, e ← d·e + (1 − d)·θ after every step, saved
    beside the raw weights as pytorch_lora_weights_ema.safetensors (and its ComfyUI twin) and in
    checkpoints (resume is exact). null: none. 0.99-0.999 are usual; 0 gives the raw weights."""
    unmasked_weight: float = attrs.field(default=0.25, validator=non_negative)
    """The loss weight outside the mask (1 inside): loss = Σ p·(v̂ − v)² / Σ p, p = w + (1 − w)·mask.
    1 makes ``loss_mask`` change nothing."""
    route: Literal["none", "tread"] = attrs.field(default="none", validator=v.in_(("none", "tread")))
    """Token routing (SimpleTuner's TREAD): each step, a random route_ratio of the target image's tokens skips
    the blocks route_blocks and rejoins after them; control and text tokens always go through, predict and
    validation route nothing. Less work a step; what it does to learning: docs/what_options_do.md."""
    route_ratio: float = attrs.field(default=0.5, validator=v.and_(v.ge(0.0), v.lt(1.0)))
    """tread: the share r of target tokens that skip (round(r·N) of N; 0 routes none)."""
    route_blocks: tuple[int, int] = attrs.field(default=(1, -1), converter=tuple)
    """tread: [first, last] repeated blocks routed, inclusive, in forward order (FLUX.1 and FLUX.2: double
    blocks, then single ones); negative counts from the end. The first block always sees every token."""
    route_keep_changed: bool = True
    """tread with loss_mask: tokens where the change mask is set are never skipped while the region
    covers at most 1 − route_ratio of the image."""
    save_dtype: Dtype = attrs.field(default="float32", validator=v.in_(DTYPES))
    """dtype of the saved LoRA tensors."""
    checkpointing_steps: int = attrs.field(default=50, validator=non_negative)
    """Write ``checkpoint-<step>/`` every this many optimizer steps (0: only at the end). A run that
    ends always writes ``checkpoint-<last step>``, so a larger max_train_steps resumes from it."""
    checkpoints_total_limit: int | None = attrs.field(default=3, validator=positive_or_none)
    """Keep only the newest this many checkpoints (null: keep all)."""
    max_nonfinite_steps: int = attrs.field(default=10, validator=positive)
    """Stop after this many steps in a row whose loss or gradient was not finite (each is skipped)."""

    def __attrs_post_init__(self) -> None:
        logit = self.timestep_sampling in ("logit_normal", "shift", "resolution_shift")
        sampler = "train.timestep_sampling: "
        read_only_when(self, "train", {
            "logit_mean": (logit, sampler + "logit_normal, shift or resolution_shift"),
            "logit_std": (logit, sampler + "logit_normal, shift or resolution_shift"),
            "mode_scale": (self.timestep_sampling == "mode", sampler + "mode"),
            "timestep_shift": (self.timestep_sampling == "shift", sampler + "shift"),
            "huber_c": (self.loss != "mse", "train.loss: huber or pseudo_huber"),
            "route_ratio": (self.route == "tread", "train.route: tread"),
            "route_blocks": (self.route == "tread", "train.route: tread"),
            "route_keep_changed": (self.route == "tread" and self.loss_mask != "none",
                                   "train.route: tread with train.loss_mask: masks or auto"),
            "preserve_weight": (self.preserve == "base" or self.preserve_prompt is not None,
                                "train.preserve: base or train.preserve_prompt"),
        })  # fmt: skip
        if self.preserve == "base" and self.loss_mask == "none":
            raise ValueError(
                "train.preserve: base keeps the base model's prediction outside the change mask, and "
                "train.loss_mask: none has none; set train.loss_mask: auto (or masks)"
            )
        if self.compile is True and self.gradient_checkpointing:
            raise ValueError(
                "compile: true (one graph through torch.func) cannot recompute checkpointed blocks; "
                "with gradient_checkpointing use compile: regional (or false)"
            )
        if self.compile is True and self.fp8_matmul:
            raise ValueError(
                "compile: true (one graph through torch.func) cannot differentiate the fp8 layers; "
                "with fp8_matmul use compile: regional (or auto, or false)"
            )


@attrs.frozen
class CacheConfig:
    """The embedding cache (``cache`` command, and training with ``use_cache``)."""

    use_cache: bool = False
    """Train from cached latents and embeddings; only the transformer is loaded."""
    cache_dir: str = "outputs/cache"
    """Root of the content-addressed cache; safe to share between runs, datasets and models."""


@attrs.frozen
class Devices:
    """Where each component runs, for every command: training, caching, validation and predict
    ('auto': cuda if available, else cpu; 'cpu', 'cuda', 'cuda:N', 'mps')."""

    transformer: str = device_field()
    """The transformer: the training step, previews, predict's denoising."""
    vae: str = device_field()
    """The VAE: encoding images (training without the cache, caching, predict) and decoding
    (predict, validation and the sample; from the cache it loads only for those and is freed)."""
    text_encoder: str = device_field()
    """The text encoder (CLIP; Qwen2.5-VL with the control images)."""


@attrs.frozen
class LoggingConfig:
    """Where results go."""

    output_dir: str | None = None
    """Folder for the LoRA, the checkpoints, the resolved config, the loss curve and the sample
    image. null: outputs/<recipe> (outputs/flux_kontext_lora, outputs/qwen_image_edit_lora)."""
    write_sample: bool = True
    """Write sample.png at the end: the first sample's control image(s) | target | the edit before
    and after training (same seed, its conditioning from the training data path, at the target's
    size). Training from the cache loads only the VAE for it, on ``predict.devices.vae``."""
    report_to: Literal["tensorboard", "jsonl", "none"] = attrs.field(
        default="tensorboard", validator=v.in_(("tensorboard", "jsonl", "none"))
    )
    """Where scalars (loss, lr, grad_norm, steps/s, samples/s, val_loss) and validation grids go:
    TensorBoard event files, a metrics.jsonl file, or nowhere."""
    logging_dir: str = "logs"
    """Folder of the TensorBoard events / metrics.jsonl, under output_dir."""
    overwrite: bool = False
    """A fresh run into an output_dir that holds another run's LoRA or checkpoints stops with exit
    code 2 and changes nothing. true: remove what qflux wrote there (LoRA files, checkpoints, config,
    pictures, logs) first, and list it."""


@attrs.frozen
class ValidationConfig:
    """Held-out edits rendered and scored during training."""

    enabled: bool = False
    """Render validation grids and compute the validation loss before the first step, every
    validation_steps, and at the end."""
    validation_steps: int = attrs.field(default=50, validator=positive)
    """Optimizer steps between validations."""
    num_validation_samples: int = attrs.field(default=4, validator=positive)
    """How many held-out samples to use (the first ones, by name)."""
    dataset_path: str | None = None
    """Held-out pairs in the training layout. null: the built-in dataset's own held-out pairs when training on
    one (builtin:toy-<edit>, builtin:synthetic); otherwise set this or samples."""
    samples: tuple[tuple[str, ...], ...] = ()
    """Instead of dataset_path: a list of [control image, prompt] or [control image, prompt, target
    image]. Samples without a target have no target panel and no validation loss."""
    num_inference_steps: int = attrs.field(default=28, validator=positive)
    """Denoising steps of each validation prediction and of sample.png (fixed seed: the run's seed)."""
    use_ema: bool = False
    """Validate (loss, grid, edit metrics) with the moving average of the LoRA instead of its raw
    weights; needs train.ema_decay."""


@attrs.frozen
class RecipeConfig:
    """A LoRA recipe's whole configuration: the sections every model shares, its model section and
    its devices (the subclasses name the model's own)."""

    seed: int = 0
    """Seeds every random draw: LoRA init, data order, noise, timesteps and dropout."""
    resume_from_checkpoint: str | None = None
    """'latest' (the newest checkpoint in logging.output_dir, or a fresh start if none), a
    checkpoint folder, or null for a fresh run."""
    model: ModelSection = attrs.field(kw_only=True)
    """The model and how its frozen weights are held (each recipe's subclass names its section)."""
    data: DataConfig = attrs.field(factory=DataConfig)
    optimizer: OptimizerConfig = attrs.field(factory=OptimizerConfig)
    lr_scheduler: LrSchedulerConfig = attrs.field(factory=LrSchedulerConfig)
    train: TrainConfig = attrs.field(factory=TrainConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    cache: CacheConfig = attrs.field(factory=CacheConfig)
    devices: Devices = attrs.field(factory=Devices)
    """Where each component runs."""
    validation: ValidationConfig = attrs.field(factory=ValidationConfig)

    @property
    def output_dir(self) -> str:
        """``logging.output_dir``, or ``outputs/<recipe>`` when it is null."""
        return self.logging.output_dir or f"outputs/{type(self.model).recipe}"

    def resolved(self) -> RecipeConfig:
        """The config with its derived defaults written in (``logging.output_dir``), as it is saved."""
        return attrs.evolve(self, logging=attrs.evolve(self.logging, output_dir=self.output_dir))
