"""Parts every tiny model is built from, offline: tokenizers built in code, size presets, a seeded draw of the
weights, the flow-matching scheduler and the saved pipeline folder.

Each model family's tiny builder (``qflux/models/<family>/tiny.py``) composes them; ``python -m qflux.tiny``
runs the builders.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# Characters the tiny tokenizers know; anything else maps to the unknown token.
_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-:;()"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte→unicode table (printable stand-ins for all 256 bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_tokenizer() -> Any:
    """A byte-level CLIP BPE tokenizer over all 256 bytes plus a few merges, built in code."""
    # deferred: transformers is a heavy import
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("e", "d</w>"), ("i", "n"), ("t", "h"), ("th", "e</w>"), ("o", "n</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer(words: Sequence[str] = (), model_max_length: int = 512) -> Any:
    """A unigram T5 tokenizer over single characters and a few words, built in code; each of ``words``
    (a toy world's vocabulary) is one whole-word piece, preferred to spelling it out. ``model_max_length``
    is the prompt length its model is trained at (FLUX.1: 512)."""
    # deferred: transformers is a heavy import
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    common = ["▁the", "▁make", "▁turn", "▁color", "▁image", "▁invert", "▁flip", "▁red", "▁blue"]
    pieces += [(w, -3.0) for w in common]
    pieces += [(c, -5.0) for c in _ALPHABET]
    pieces += [("▁" + c, -4.0) for c in _ALPHABET]
    pieces += [("▁" + w, -1.0) for w in words if "▁" + w not in common]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


Overrides = Mapping[str, Any]


def by_size(sizes: tuple[str, ...], table: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Presets from a table that gives each setting once, as its values in ``sizes`` order: a plain key
    (``{"latent_channels": (4, 16)}``) or a section of them (``{"vae": {"norm_num_groups": (4, 8)}}``)."""

    def pick(value: Any, i: int) -> Any:
        return {k: pick(v, i) for k, v in value.items()} if isinstance(value, Mapping) else value[i]

    return {size: pick(table, i) for i, size in enumerate(sizes)}


def preset(presets: Mapping[str, dict[str, Any]], size: str, overrides: Overrides | None) -> dict[str, Any]:
    """The preset ``size`` with ``overrides`` merged in: a section's keys are updated
    (``{"vae": {"block_out_channels": (8, 16, 16)}}``), a plain key is replaced."""
    if size not in presets:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(presets)}")
    p = dict(presets[size])
    for key, value in (overrides or {}).items():
        if key not in p:
            raise ValueError(f"unknown tiny-model setting {key!r}; choose from {sorted(p)}")
        p[key] = {**p[key], **value} if isinstance(p[key], dict) else value
    return p


# The special tokens of a chat and vision template (Qwen2.5-VL's and Qwen3's), in its order.
CHAT_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip


def chat_tokenizer(tokenizer_cls: Any) -> Any:
    """A byte-level BPE tokenizer of ``tokenizer_cls`` (the family's: transformers' ``Qwen2Tokenizer``) over all
    256 bytes, a few merges and the chat/vision special tokens, built in code."""
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[CHAT_SPECIAL_TOKENS[0]] = len(vocab)
    tok = tokenizer_cls(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": list(CHAT_SPECIAL_TOKENS[1:])})
    return tok


def chat_token_ids(tok: Any) -> dict[str, int]:
    """Each of :data:`CHAT_SPECIAL_TOKENS` → its id in the chat tokenizer ``tok`` (:func:`chat_tokenizer`)."""
    return dict(zip(CHAT_SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(CHAT_SPECIAL_TOKENS)), strict=True))


def chat_text_config(tok: Any) -> dict[str, Any]:
    """The settings a chat tokenizer (:func:`chat_tokenizer`) fixes in its text model's config: ``vocab_size``
    (the tokenizer's length rounded up to a multiple of 16), no bos token, eos ``<|im_end|>``, pad
    ``<|endoftext|>``."""
    ids = chat_token_ids(tok)
    return {
        "vocab_size": -(-len(tok) // 16) * 16,
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[IMG]", "[IMG_BREAK]", "[IMG_END]")  # fmt: skip
"""Mistral 3's control tokens (Tekken's), in its order: ids 0 to 10."""

MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
"""Mistral Small 3.1's chat template, reduced to what FLUX.2 [dev]'s pipeline renders: a system turn and user
turns whose content is a string or a list of text parts."""


def mistral_tokenizer(words: Sequence[str] = ()) -> Any:
    """A byte-level BPE tokenizer (transformers' ``PreTrainedTokenizerFast``) over all 256 bytes, Mistral 3's
    control tokens and chat template, built in code; each of ``words`` is one token after a space (merges
    spell it out a character at a time), so a long system message stays short."""
    # deferred: tokenizers and transformers are heavy imports
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(MISTRAL_SPECIAL_TOKENS)}
    byte = _bytes_to_unicode()
    for c in byte.values():
        vocab[c] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        spelt = byte[ord(" ")] + "".join(byte[b] for b in word.encode("utf-8"))
        for i in range(2, len(spelt) + 1):
            if spelt[:i] not in vocab:
                merges.append((spelt[: i - 1], spelt[i - 1]))
                vocab[spelt[:i]] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=list(MISTRAL_SPECIAL_TOKENS[4:]),
    )  # fmt: skip
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside: the global torch RNG starts from ``seed``, so the weights modules draw there are a function of
    it and of the order they are built in. The caller's RNG is restored on leaving."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def flow_scheduler(**settings: Any) -> Any:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` over 1000 training steps with dynamic shifting (the pipeline
    computes each run's shift μ); ``settings``: the model's other arguments (``shift``, ``base_shift``, ...)."""
    # deferred: diffusers is a heavy import
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True, **settings)


def save_pipeline(pipeline_cls: Any, out_dir: str | Path, components: Mapping[str, Any]) -> Path:
    """Write ``pipeline_cls(**components)`` to ``out_dir`` in the diffusers folder layout.

    Returns:
        The folder; ``pipeline_cls.from_pretrained(path)`` loads it.
    """
    out = Path(out_dir)
    pipeline_cls(**components).save_pretrained(out)
    return out
