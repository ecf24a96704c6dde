"""The toy world: scenes are deterministic values, every edit does what its instruction says and keeps the
scene valid, and the command writes what it documents and refuses to overwrite."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from qflux.config.errors import QfluxError
from qflux.data.pairs import scan_pairs
from qflux.models import FAMILIES
from qflux.models.flux_kontext.conditioning import text_length
from qflux.models.flux_kontext.loaders import load_flux_kontext
from qflux.toy import WORLD_DIGEST
from qflux.toy.__main__ import main
from qflux.toy.build import RECORD, build_start, build_transformer, build_vae, store
from qflux.toy.edits import EDITS, TAUGHT, VOCABULARY, edited_pair, write_pairs
from qflux.toy.pretraining import PretrainSettings, edit_scores
from qflux.toy.vae_training import VaeSettings
from qflux.toy.world import DARK, Scene, fits, random_scene, render
from qflux.train.builtin import resolve_dataset_path, resolve_model_path
from qflux.train.family import toy_name


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _valid(scene: Scene) -> None:
    names = [s.name for s in scene.shapes]
    assert len(names) == len(set(names))  # every shape can be named
    for i, s in enumerate(scene.shapes):
        assert fits(s, scene.shapes[:i] + scene.shapes[i + 1 :], scene.size, gap=0.0)


@given(seed=st.integers(0, 2**31 - 1), edit=st.sampled_from(sorted(EDITS)))
def test_every_edit_keeps_the_scene_valid_and_says_what_it_did(seed: int, edit: str) -> None:
    control, target, text = edited_pair(np.random.default_rng(seed), [edit])
    _valid(control)
    _valid(target)
    assert set(text.split()) <= set(VOCABULARY)
    a, b = np.asarray(render(control), dtype=np.int16), np.asarray(render(target), dtype=np.int16)
    changed = np.abs(a - b).sum(-1) > 0
    assert changed.any()  # an edit always changes the picture
    local = ("recolour", "remove", "move", "grow", "shrink", "darken", "invert_shape")
    if edit in local:  # only the named shape changes
        kind = text.split()[3]
        s = control.shapes[control.find(" ".join(text.split()[2:4]))]
        after = [t for t in target.shapes if t.kind == kind and t not in control.shapes]
        ys, xs = np.nonzero(changed)
        for x, y in zip(xs + 0.5, ys + 0.5, strict=True):  # pixel centres, inside a box of either shape
            assert any(abs(x - o.x) <= o.r + 1 and abs(y - o.y) <= o.r + 1 for o in (s, *after))
    if edit == "recolour":
        assert [t.colour for t in target.shapes if (t.x, t.y) == (s.x, s.y)] == [text.split()[-1]]
    if edit == "darken":
        assert s.shade == 1.0 and target.shapes[control.shapes.index(s)].shade == DARK
    if edit == "invert":  # the negative: every channel c → 255 − c
        assert np.array_equal(a, 255 - b)
    if edit == "invert_shape":  # the named shape in its colour's negative
        t = target.shapes[control.shapes.index(s)]
        assert t.inverted and t.rgb == tuple(255 - c for c in s.rgb)
    if edit == "grayscale":  # every pixel gray, and a pixel gray already stays exactly as it was
        assert (b == b[..., :1]).all()
        gray = (a == a[..., :1]).all(-1)
        assert np.array_equal(a[gray], b[gray])


def test_scenes_are_a_function_of_the_seed() -> None:
    a = [random_scene(np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    assert np.array_equal(np.asarray(render(a[0])), np.asarray(render(a[1])))
    assert random_scene(np.random.default_rng(4)) != a[0]


def test_the_command_writes_scenes_and_pairs_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["scenes", str(tmp_path / "s"), "--n=3", "--seed=5"])
    main(["scenes", str(tmp_path / "s2"), "--n=3", "--seed=5"])
    assert _digest(tmp_path / "s") == _digest(tmp_path / "s2")
    listing = json.loads((tmp_path / "s" / "scenes.json").read_text())
    assert sorted(listing) == ["scene_0000.png", "scene_0001.png", "scene_0002.png"]
    before = _digest(tmp_path / "s")
    with pytest.raises(SystemExit) as e:
        main(["scenes", str(tmp_path / "s"), "--n=1"])
    assert e.value.code == 2 and "already holds files" in capsys.readouterr().err
    assert _digest(tmp_path / "s") == before

    main(["pairs", str(tmp_path / "p"), "--edit=grow,mirror", "--n=4", "--seed=1"])
    names = sorted(p.stem for p in (tmp_path / "p" / "control_images").iterdir())
    assert names == [f"pair_{i:04d}" for i in range(4)]
    for name in names:
        text = (tmp_path / "p" / "training_images" / f"{name}.txt").read_text().strip()
        assert text == json.loads((tmp_path / "p" / "pairs.json").read_text())[name]["instruction"]
        assert text.endswith("bigger") or text == "mirror the picture"
    with pytest.raises(SystemExit):
        main(["pairs", str(tmp_path / "q"), "--edit=fly"])
    assert "unknown edit 'fly'" in capsys.readouterr().err


def test_the_taught_edits_are_a_subset() -> None:
    assert set(TAUGHT) < set(EDITS)


def test_each_edit_is_a_builtin_dataset_with_its_own_held_out_pairs() -> None:
    train, held = resolve_dataset_path("builtin:toy-darken"), resolve_dataset_path("builtin:toy-darken", heldout=True)
    assert (
        len(list((train / "control_images").iterdir())) == 64 and len(list((held / "control_images").iterdir())) == 16
    )
    texts = [p.read_text() for p in (train / "training_images").glob("*.txt")]
    assert all(t.endswith(" darker\n") for t in texts)
    assert resolve_dataset_path("builtin:toy-darken") == train  # written once
    assert train.name == f"toy-darken-{WORLD_DIGEST}-train"  # a changed world writes its datasets anew
    with pytest.raises(QfluxError, match="builtin:toy-invert"):  # an unknown name lists the known ones
        resolve_dataset_path("builtin:toy-fly")


def test_the_prompt_length_follows_the_model_folder(tiny_flux_dir: Path) -> None:
    assert text_length(None, tiny_flux_dir) == 512 and text_length(77, tiny_flux_dir) == 77
    assert text_length(None, None) == 512  # a folder not at hand: FLUX.1's


def test_the_build_stages_write_a_folder_the_pipeline_loads(tmp_path: Path) -> None:
    """Each stage leaves a loadable diffusers folder and says what it did in toy_build.json (a few steps)."""
    toy = FAMILIES["flux_kontext"].toy
    assert toy is not None
    out = build_start(tmp_path / "toy", toy, seed=0)
    assert build_vae(out, toy, VaeSettings(steps=2, batch_size=2)) > 0
    settings = PretrainSettings(steps=2, batch_size=2, pairs=4, eval_pairs=2, sample_steps=2, warmup=1, eval_every=1)
    changed, _ = build_transformer(out, toy, settings, tmp_path / "work")
    assert np.isfinite(changed)
    assert all(
        t.dtype == torch.float32 for t in load_file(out / "vae" / "diffusion_pytorch_model.safetensors").values()
    )
    store(out)
    record = json.loads((out / RECORD).read_text())
    assert set(record) == {"start", "vae", "transformer", "stored"} and len(record["transformer"]["curve"]) == 1
    assert all(
        t.dtype == torch.bfloat16 for t in load_file(out / "vae" / "diffusion_pytorch_model.safetensors").values()
    )
    pipe = FluxKontextPipeline.from_pretrained(out)
    assert pipe.vae.config.shift_factor == record["vae"]["shift_factor"]
    assert len(pipe.tokenizer_2("make the red circle blue").input_ids) == 6  # one piece per word, and the end
    assert text_length(None, out) == 32 == pipe.tokenizer_2.model_max_length  # the prompt length follows the folder


def test_the_committed_toy_model_performs_its_taught_edits(tmp_path: Path) -> None:
    """``python -m qflux.toy model`` writes the committed toy, which edits held-out scenes of the taught edits
    (16 sampling steps): better than copying the control where the edit is, and keeping the rest."""

    main(["model", str(tmp_path / "toy")])
    toy = FAMILIES["flux_kontext"].toy
    assert toy is not None and (tmp_path / "toy" / "transformer" / "config.json").exists()
    assert toy_name(FAMILIES["flux_kontext"]) == "builtin:toy-flux-kontext"
    # a changed toy is copied to a new folder, never read stale from an old one
    assert Path(resolve_model_path("builtin:toy-flux-kontext")).name == f"toy-flux-kontext-{toy.digest()}"
    models = load_flux_kontext(tmp_path / "toy", torch.float32)
    data, ops = toy.paths(models)
    root = write_pairs(tmp_path / "held_out", TAUGHT, 8, seed=12345)
    samples = scan_pairs(root, None, multiple=8, warn=lambda _: None)
    changed, unchanged = edit_scores(data, ops, samples, {}, steps=16)
    assert changed > 15 and unchanged > 20
