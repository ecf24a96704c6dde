"""FLUX.2's two prompt encoders, each through its pipeline's own helper: [klein]'s Qwen3 causal LM
(``Flux2KleinPipeline._get_qwen3_prompt_embeds``, hidden states of layers 9, 18, 27) and [dev]'s Mistral
Small 3.1 (``Flux2Pipeline._get_mistral_3_small_prompt_embeds``: BFL's system message, the chat template,
hidden states of layers 10, 20, 30). Both stack the layers per token:

    h = [H_a ; H_b ; H_c] ∈ [B, L, 3D]          (the chat-templated prompt, padded to L tokens)

[dev]'s tokenizer folder is the pipeline's Pixtral processor. Only its tokenizer is read (the processor's
image half needs torchvision and is unused for text): :func:`chat_tokenizer` loads it with the folder's chat
template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.config.errors import QfluxError


@attrs.frozen
class TextEncoder:
    """One FLUX.2 variant's prompt encoder."""

    kind: str
    """The cache's entry kind of its embeddings."""
    layers: tuple[int, ...]
    """The hidden states the pipeline stacks (its ``text_encoder_out_layers`` default)."""
    pipeline: str
    """The diffusers pipeline class whose static helper encodes."""
    helper: str
    """That helper's name."""

    def width(self, config: Mapping[str, Any]) -> int:
        """D of the text encoder's ``config.json`` (a vision-language model's ``text_config``)."""
        return int(config.get("text_config", config)["hidden_size"])

    def embed_width(self, config: Mapping[str, Any]) -> int:
        """3D: the stacked embedding's width (the transformer's ``joint_attention_dim``)."""
        return len(self.layers) * self.width(config)

    @torch.no_grad()
    def encode(
        self, text_encoder: Any, tokenizer: Any, prompts: Sequence[str], max_sequence_length: int
    ) -> torch.Tensor:
        """h [B, L, 3D] of ``prompts`` in the encoder's dtype, L = ``max_sequence_length``."""
        # deferred: diffusers is a heavy import
        import diffusers

        helper = getattr(getattr(diffusers, self.pipeline), self.helper)
        return helper(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            prompt=list(prompts),
            dtype=text_encoder.dtype,
            device=text_encoder.device,
            max_sequence_length=max_sequence_length,
            hidden_states_layers=self.layers,
        )


QWEN3 = TextEncoder("qwen3_prompt_embed", (9, 18, 27), "Flux2KleinPipeline", "_get_qwen3_prompt_embeds")
"""FLUX.2 [klein]'s encoder."""
MISTRAL3 = TextEncoder("mistral3_prompt_embed", (10, 20, 30), "Flux2Pipeline", "_get_mistral_3_small_prompt_embeds")
"""FLUX.2 [dev]'s encoder (the helper adds the pipeline's ``SYSTEM_MESSAGE`` itself)."""


def chat_tokenizer(folder: Path) -> Any:
    """The tokenizer of a Pixtral processor's folder with its chat template: the tokenizer's own, else the
    processor's (``chat_template.jinja`` or ``chat_template.json``).

    Raises:
        QfluxError: the folder has no chat template (the pipeline formats every prompt through one).
    """
    # deferred: transformers is a heavy import
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if not getattr(tok, "chat_template", None):
        jinja, js = folder / "chat_template.jinja", folder / "chat_template.json"
        if jinja.is_file():
            tok.chat_template = jinja.read_text(encoding="utf-8")
        elif js.is_file():
            tok.chat_template = json.loads(js.read_text(encoding="utf-8"))["chat_template"]
        else:
            raise QfluxError(
                f"the tokenizer at '{folder}' has no chat template (tokenizer_config.json, chat_template.jinja "
                "or chat_template.json); copy the model's tokenizer folder whole"
            )
    return tok
