"""The cache step's peak device memory, planned on fake tensors as the training step is (:mod:`qflux.memory.measure`).

A cache run (``cache``, or training from the cache with entries missing) loads the model's encoders together,
each on its own device, and runs one of them at a time on one sample:

    peak = Σ weights of the encoders on the card (as stored) + max over them of their forward's excess + allowance

- a text encoder stores its linears as ``model.quantize`` says when ``model.quantize_text_encoders`` is set, else
  in the model dtype; its forward is one prompt of the run's tokens (capped at the encoder's own
  ``max_position_embeddings``), every hidden state kept as the pipelines ask for them. A vision-language
  encoder's image tokens (Qwen-Image-Edit's control images) are not counted.
- the VAE is in the model dtype; its forward encodes one image of the run's target size (the model's own
  ``vae_encode``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from qflux.memory.measure import ALLOWANCE, GIB, fake_mode, measure_step, storage_bytes, to_fake
from qflux.memory.planner import PlanModel, store_frozen


@attrs.frozen
class EncodeStep:
    """The cache step's peak, in bytes, by what holds it."""

    weights: dict[str, int]
    """{component on the card: bytes of its weights as stored}."""
    forwards: dict[str, int]
    """{component on the card: its forward's peak over the weights}."""

    @property
    def peak(self) -> int:
        """Σ weights + the largest forward + :data:`~qflux.memory.measure.ALLOWANCE`."""
        return sum(self.weights.values()) + max(self.forwards.values(), default=0) + ALLOWANCE

    def text(self, vram_gib: float) -> str:
        """One line for the plan: each encoder's weights, the largest forward, the peak and whether it fits."""
        parts = " + ".join(f"{c} {b / GIB:.2f}" for c, b in self.weights.items()) or "nothing on the card"
        largest = max(self.forwards, key=self.forwards.__getitem__, default=None)
        forward = "" if largest is None else f", {largest}'s forward {self.forwards[largest] / GIB:.2f}"
        fits = "fits" if self.peak <= vram_gib * GIB else "does not fit"
        return (f"\ncache step (the encoders, loaded together to fill the cache): {parts} GiB as stored{forward}; "
                f"peak {self.peak / GIB:.2f} GiB, {fits} {vram_gib:g} GiB")  # fmt: skip

    def as_json(self, vram_gib: float) -> dict[str, Any]:
        return {
            "peak_gib": round(self.peak / GIB, 3),
            "fits": self.peak <= vram_gib * GIB,
            "weights_gib": {c: round(b / GIB, 3) for c, b in self.weights.items()},
            "forward_gib": {c: round(b / GIB, 3) for c, b in self.forwards.items()},
        }


def encode_step(model: PlanModel, configs: Mapping[str, Mapping[str, Any]], on_card: Sequence[str], *,
                dtype: torch.dtype, text_quantize: str, text_tokens: int,
                image: tuple[int, int]) -> EncodeStep:  # fmt: skip
    """Plan the cache step of the encoders ``on_card`` (those placed on the card).

    Args:
        text_quantize: how the text encoders' linears are stored (``model.quantize`` with
            ``model.quantize_text_encoders``, else "none").
        text_tokens: the prompt's tokens; image: (w, h) of the largest image encoded.
    """
    weights, forwards = {}, {}
    for component in on_card:
        mode = fake_mode()
        with torch.device("meta"):
            module = model.build(component, configs[component], dtype)
        module.requires_grad_(False)
        store_frozen(module, text_quantize if component.startswith("text_encoder") else "none")
        to_fake(module, mode)
        resident = [*module.parameters(), *module.buffers()]
        weights[component] = storage_bytes(resident)
        run = _forward(model, module, component, configs[component], dtype, text_tokens, image)
        forwards[component] = sum(measure_step(run, resident, mode))
    return EncodeStep(weights, forwards)


def _forward(model: PlanModel, module: Any, component: str, config: Mapping[str, Any], dtype: torch.dtype,
             tokens: int, image: tuple[int, int]) -> Any:  # fmt: skip
    """The encoder's forward on one sample, as a function of nothing (run under the fake mode)."""

    @torch.no_grad()
    def vae() -> None:
        model.vae_encode(module, torch.zeros(1, 3, image[1], image[0], dtype=dtype))

    @torch.no_grad()
    def text() -> None:
        limit = config.get("text_config", config).get("max_position_embeddings") or tokens
        n = min(tokens, int(limit))
        ids, mask = torch.zeros(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.long)
        # the pipelines keep no key/value cache
        no_cache = {"use_cache": False} if "use_cache" in inspect.signature(module.forward).parameters else {}
        module(input_ids=ids, attention_mask=mask, output_hidden_states=True, **no_cache)

    return vae if component == "vae" else text
