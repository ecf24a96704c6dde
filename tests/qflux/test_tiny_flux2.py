"""The tiny FLUX.2 [klein] and [dev]: deterministic per seed, in the diffusers layout ``Flux2KleinPipeline`` and
``Flux2Pipeline`` load, with the relations the pipelines rely on (Qwen3 layers 9, 18 and 27, Mistral's 10, 20 and
30; 3 × the encoder's width into the transformer; 4 × the VAE's latent channels patchified; [dev]'s guidance
embedding and system message through Mistral's chat template), and each edits with one and two references."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qflux.models.flux2.tiny import build_flux2_dev, build_flux2_klein
from qflux.tiny import main as tiny_main

ROOT = Path(__file__).resolve().parents[2]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.safetensors")
    }


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_flux2_klein(tmp_path_factory.mktemp("klein"), seed=0)


def test_same_seed_same_weights_other_seed_differs(klein_dir: Path, tmp_path: Path) -> None:
    rng = torch.get_rng_state()
    assert _digest(build_flux2_klein(tmp_path / "again", seed=0)) == _digest(klein_dir)
    assert torch.equal(torch.get_rng_state(), rng)
    assert _digest(build_flux2_klein(tmp_path / "other", seed=1)) != _digest(klein_dir)


def test_the_pipeline_loads_it_and_edits_with_one_and_two_references(klein_dir: Path) -> None:
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    pipe.set_progress_bar_config(disable=True)
    text, tr, vae = pipe.text_encoder.config, pipe.transformer.config, pipe.vae.config
    assert text.num_hidden_layers >= 27  # hidden_states[27] exists
    assert tr.joint_attention_dim == 3 * text.hidden_size
    assert tr.in_channels == 4 * vae.latent_channels
    assert pipe.vae.bn.running_var.min() > 1  # non-trivial normalisation statistics
    rendered = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)  # fmt: skip
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)) for _ in range(2)]
    images = []
    for n, guidance in ((1, 1.0), (2, 4.0)):
        out = pipe(image=refs[:n], prompt="make it red", height=64, width=96, num_inference_steps=2,
                   guidance_scale=guidance, generator=torch.Generator().manual_seed(0), output_type="np",
                   max_sequence_length=32)  # fmt: skip
        assert out.images[0].shape == (64, 96, 3) and np.isfinite(out.images[0]).all()
        images.append(out.images[0])
    assert not np.array_equal(images[0], images[1])


def test_cli_builds_it(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "qflux.tiny", "flux2_klein", str(tmp_path / "m")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "model_index.json").is_file()
    proc = subprocess.run([sys.executable, "-m", "qflux.tiny", "flux2_klein", str(tmp_path / "n"), "--size=huge"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "unknown size 'huge'" in proc.stderr


def test_the_tiny_dev_is_deterministic_and_flux2pipeline_edits_with_one_and_two_references(tmp_path: Path) -> None:
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    tiny_main("flux2_dev", str(tmp_path / "dev"), seed=0)
    assert _digest(build_flux2_dev(tmp_path / "again", seed=0)) == _digest(tmp_path / "dev")
    assert _digest(build_flux2_dev(tmp_path / "other", seed=1)) != _digest(tmp_path / "dev")
    pipe = Flux2Pipeline.from_pretrained(tmp_path / "dev")
    pipe.set_progress_bar_config(disable=True)
    text, tr, vae = pipe.text_encoder.config.text_config, pipe.transformer.config, pipe.vae.config
    assert type(pipe.text_encoder).__name__ == "Mistral3ForConditionalGeneration"
    assert text.num_hidden_layers >= 30 and tr.guidance_embeds  # hidden_states[30] exists
    assert tr.joint_attention_dim == 3 * text.hidden_size and tr.in_channels == 4 * vae.latent_channels
    rendered = pipe.tokenizer.apply_chat_template(format_input(["make it red"], SYSTEM_MESSAGE), tokenize=False)[0]
    assert rendered == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]make it red[/INST]"
    assert len(pipe.tokenizer(rendered, add_special_tokens=False).input_ids) < 64  # whole-word tokens
    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)) for _ in range(2)]
    images = []
    for n in (1, 2):
        out = pipe(image=refs[:n], prompt="make it red", height=64, width=96, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=80)  # fmt: skip
        assert out.images[0].shape == (64, 96, 3) and np.isfinite(out.images[0]).all()
        images.append(out.images[0])
    assert not np.array_equal(images[0], images[1])


def test_a_dev_folder_in_the_hubs_processor_layout_loads_without_torchvision(tmp_path: Path) -> None:
    """The real FLUX.2 [dev] folder's ``tokenizer/`` is a Pixtral processor (``model_index.json`` names
    ``PixtralProcessor``, which needs torchvision) with its chat template in ``chat_template.json``: qflux reads the
    tokenizer and that template and encodes the prompt as from the plain tokenizer; a folder with no chat template
    is refused with the fix."""
    import json

    from qflux.config.errors import QfluxError
    from qflux.models.flux2.conditioning import encode_prompt
    from qflux.models.flux2.loaders import DEV

    path = build_flux2_dev(tmp_path / "dev", seed=0)
    plain = DEV.files.load(path, torch.float32, include=("text_encoder",))
    want = encode_prompt(DEV.text, plain.text_encoder, plain.tokenizer, ["make it red"], 80).tokens
    folder = path / "tokenizer"
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    processor = {
        "processor_class": "PixtralProcessor",
        "patch_size": 8,
        "spatial_merge_size": 2,
        "image_token": "[IMG]",
    }
    (folder / "processor_config.json").write_text(json.dumps(processor))
    images = {"image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(images))
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "PixtralProcessor"]}))
    hub = DEV.files.load(path, torch.float32, include=("text_encoder",))
    assert hub.tokenizer.chat_template == template
    got = encode_prompt(DEV.text, hub.text_encoder, hub.tokenizer, ["make it red"], 80).tokens
    assert torch.equal(got, want)
    (folder / "chat_template.json").unlink()
    with pytest.raises(QfluxError, match="no chat template"):
        DEV.files.load(path, torch.float32, include=())
