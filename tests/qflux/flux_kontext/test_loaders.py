"""Each qflux loader gives exactly the component the diffusers pipeline loads; failures are one clear sentence."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qflux.config.errors import QfluxError
from qflux.models.flux_kontext import loaders
from qflux.weights.loading import load_part


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("attr", ["text_encoder", "text_encoder_2", "vae", "transformer"])
def test_component_equals_pipeline_component(tiny_flux_dir: Path, flux_pipe, attr: str) -> None:
    ours = load_part(loaders.FLUX_KONTEXT, tiny_flux_dir, attr, torch.float32, "cpu")
    _same_params(ours, getattr(flux_pipe, attr))
    assert not any(p.requires_grad for p in ours.parameters())
    assert not ours.training


def test_dtype_is_applied(tiny_flux_dir: Path) -> None:
    vae = load_part(loaders.FLUX_KONTEXT, tiny_flux_dir, "vae", torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}


def test_tokenizers_and_scheduler_equal_pipeline(tiny_flux_dir: Path, flux_pipe) -> None:
    tok, tok2 = (load_part(loaders.FLUX_KONTEXT, tiny_flux_dir, n) for n in ("tokenizer", "tokenizer_2"))
    text = ["make the image red", "", "Invert the colors, please!"]
    assert (
        tok(text, padding="max_length", max_length=77).input_ids
        == flux_pipe.tokenizer(text, padding="max_length", max_length=77).input_ids
    )
    assert (
        tok2(text, padding="max_length", max_length=32).input_ids
        == flux_pipe.tokenizer_2(text, padding="max_length", max_length=32).input_ids
    )
    sched = load_part(loaders.FLUX_KONTEXT, tiny_flux_dir, "scheduler")
    assert dict(sched.config) == dict(flux_pipe.scheduler.config)


def test_missing_folder_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(QfluxError, match=r"does not exist; expected a FLUX.1 Kontext model in the diffusers layout"):
        load_part(loaders.FLUX_KONTEXT, tmp_path / "nope", "vae", torch.float32)


def test_wrong_layout_names_missing_parts(tmp_path: Path, tiny_flux_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_flux_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(QfluxError, match=r"missing vae/config.json"):
        load_part(loaders.FLUX_KONTEXT, broken, "vae", torch.float32)
    (broken / "model_index.json").unlink()
    with pytest.raises(QfluxError, match=r"missing model_index.json"):
        load_part(loaders.FLUX_KONTEXT, broken, "transformer", torch.float32)


def test_unfetchable_hub_id_is_one_sentence() -> None:
    with pytest.raises(QfluxError) as info:
        load_part(loaders.FLUX_KONTEXT, "black-forest-labs/FLUX.1-Kontext-dev", "transformer", torch.float32)
    msg = str(info.value)
    assert "could not fetch 'black-forest-labs/FLUX.1-Kontext-dev'" in msg
    assert "local folder" in msg and "\n" not in msg


def test_corrupt_weights_are_reported(tmp_path: Path, tiny_flux_dir: Path) -> None:
    broken = tmp_path / "corrupt"
    shutil.copytree(tiny_flux_dir, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QfluxError, match=r"could not load vae from .*corrupt"):
        load_part(loaders.FLUX_KONTEXT, broken, "vae", torch.float32)
