"""The README's configuration reference is generated from the schema and kept current."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from qflux.config.parse import schema_keys
from qflux.config.reference import current_section, reference_rows, render_reference, update_file
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.qwen_image_edit.config import QwenImageEditConfig
from qflux.models.reference import REFERENCES

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("markers", list(REFERENCES), ids=["flux", "qwen", "klein", "dev"])
def test_readme_reference_is_current(markers: tuple[str, str]) -> None:
    assert current_section(README, *markers) == render_reference(REFERENCES[markers]), (
        "README.md's configuration reference is stale: run `python -m qflux.models.reference README.md`"
    )


@pytest.mark.parametrize("cls", [FluxKontextConfig, QwenImageEditConfig])
def test_every_schema_key_is_in_the_reference(cls: type) -> None:
    assert [row[0] for row in reference_rows(cls)] == schema_keys(cls)


@attrs.frozen
class _Inner:
    documented: int = 1
    """Has a docstring."""
    undocumented: int = 2


@attrs.frozen
class _Outer:
    inner: _Inner = attrs.field(factory=_Inner)


def test_a_key_without_a_docstring_fails() -> None:
    with pytest.raises(ValueError, match=r"config key 'inner.undocumented' has no docstring"):
        reference_rows(_Outer)


def test_update_file_rewrites_between_the_markers(tmp_path: Path) -> None:
    from qflux.config.reference import END, START

    page = tmp_path / "page.md"
    page.write_text(f"intro\n{START}\nold\n{END}\noutro\n")
    assert update_file(page, REFERENCES) and not update_file(page, REFERENCES)
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "| `seed` |" in text
    (tmp_path / "bare.md").write_text("no markers")
    with pytest.raises(ValueError, match="no config-reference markers"):
        update_file(tmp_path / "bare.md", REFERENCES)
