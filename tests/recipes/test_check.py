"""The ``check`` command on a real folder: of 8 pairs, the 2 whose targets were exported shifted by
about 10 px are named, and it exits 0; dataset errors still exit 2; ``train`` shows the same
warnings at its start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from qflux.data.synthetic import draw_scene
from recipes import flux_kontext_lora, qwen_image_edit_lora
from tests.flux_kontext_batches import TINY, tiny_args

SHIFTED = {"pair_2": (10, 0), "pair_5": (-6, 8)}


def _pairs(root: Path, n: int = 8) -> Path:
    """``n`` photo-like pairs (colours inverted); the targets in SHIFTED cut 10 px off."""
    for sub in ("control_images", "training_images"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        canvas = np.asarray(draw_scene(rng, (360, 280)), dtype=np.int16)
        canvas = np.clip(canvas + rng.normal(0, 10, (280, 360, 1)), 0, 255).astype(np.uint8)
        picture = Image.fromarray(canvas)
        name = f"pair_{i}"
        dx, dy = SHIFTED.get(name, (0, 0))
        picture.crop((20, 20, 340, 260)).save(root / "control_images" / f"{name}.png")
        target = ImageOps.invert(picture.crop((20 - dx, 20 - dy, 340 - dx, 260 - dy)))
        target.save(root / "training_images" / f"{name}.png")
        (root / "training_images" / f"{name}.txt").write_text(f"invert the colors of picture {i}\n")
    return root


@pytest.mark.parametrize("recipe", [flux_kontext_lora, qwen_image_edit_lora])
def test_check_names_exactly_the_two_shifted_pairs_and_exits_0(recipe, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = _pairs(tmp_path / "pairs")
    recipe.main(["check", f"--data.dataset_path={data}", *tiny_args(recipe, data=False)])  # returns: exit 0
    out = capsys.readouterr().out.strip().splitlines()
    warnings = [line for line in out if line.startswith("warning:")]
    assert sorted(w.split(":")[1].strip() for w in warnings) == sorted(SHIFTED)
    assert "warning: pair_2: the target is shifted by +10, +0 px" in warnings[0] + warnings[1]
    assert "warning: pair_5: the target is shifted by -6, +8 px" in warnings[0] + warnings[1]
    assert out[-1] == "check: 8 pairs, 2 warning(s) on 2 pair(s); training would still run"


def test_check_still_exits_2_on_dataset_errors(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = _pairs(tmp_path / "pairs", n=3)
    (data / "training_images" / "pair_1.txt").unlink()
    with pytest.raises(SystemExit) as info:
        flux_kontext_lora.main(["check", f"--data.dataset_path={data}", TINY[0]])
    assert info.value.code == 2 and "pair_1" in capsys.readouterr().err


def test_train_shows_the_warnings_at_its_start(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = _pairs(tmp_path / "pairs", n=4)
    run = tmp_path / "run"
    steps = ["--train.max_train_steps=1", "--data.max_pixels=4096", "--logging.write_sample=false", TINY[0]]
    flux_kontext_lora.main(["train", f"--data.dataset_path={data}", f"--logging.output_dir={run}", *steps])
    out = capsys.readouterr().out
    assert "warning: pair_2: the target is shifted by +10, +0 px" in out
    assert (run / "pytorch_lora_weights.safetensors").exists()
