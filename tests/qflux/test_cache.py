"""The content-addressed store: atomic writes, keys, and detection of corrupt entries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qflux.train.cache import CorruptEntry, check_entry, content_key, entry_path, file_digest, read_entry, write_entry

SHAPES = {"a": (2, 3), "b": (4,)}


def _entry(tmp_path: Path) -> Path:
    path = entry_path(tmp_path, "kind", content_key({"x": 1}))
    write_entry(path, {"a": torch.ones(2, 3), "b": torch.arange(4.0)}, {"x": 1})
    return path


def test_round_trip_and_no_temporary_files(tmp_path: Path) -> None:
    path = _entry(tmp_path)
    assert path.parent.parent.name == "kind" and path.parent.name == path.stem[:2]
    assert check_entry(path, SHAPES) is None
    got = read_entry(path, SHAPES)
    assert torch.equal(got["b"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_missing_truncated_garbage_and_wrong_shapes_are_detected(tmp_path: Path) -> None:
    path = _entry(tmp_path)
    assert check_entry(tmp_path / "nope.safetensors", SHAPES) == "missing"
    assert "expected" in (check_entry(path, {"a": (3, 2), "b": (4,)}) or "")
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    assert "truncated" in (check_entry(path, SHAPES) or "")
    with pytest.raises(CorruptEntry):
        read_entry(path, SHAPES)
    path.write_bytes(b"\x05\x00")
    assert "too short" in (check_entry(path, SHAPES) or "")
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    assert "exceeds the file size" in (check_entry(path, SHAPES) or "")
    path.write_bytes((4).to_bytes(8, "little") + b"{no}")
    assert "unreadable safetensors header" in (check_entry(path, SHAPES) or "")


@given(items=st.dictionaries(st.text(max_size=5), st.integers(), max_size=5))
def test_content_key_ignores_order_and_sees_values(items: dict[str, int]) -> None:
    reordered = dict(reversed(list(items.items())))
    assert content_key(items) == content_key(reordered)
    assert content_key({**items, "extra": 1}) != content_key(items) or "extra" in items


def test_file_digest_follows_content(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    d1 = file_digest(f)
    f.write_bytes(b"abd")
    assert file_digest(f) != d1
    f.write_bytes(b"abc")
    assert file_digest(f) == d1


def test_progress_counts_what_the_summary_counts(tmp_path: Path) -> None:
    """Jobs that share an entry (one prompt for many samples) are one step of the progress bar,
    so the bar's count and the computed + reused count agree."""
    from qflux.train.cache import fill_entries, make_entry

    shared = make_entry(tmp_path, {"kind": "prompt", "text": "same"}, {"a": (2,)})
    own = [make_entry(tmp_path, {"kind": "latent", "i": i}, {"a": (2,)}) for i in range(3)]
    jobs = [(e, lambda: {"a": torch.zeros(2)}) for mine in own for e in (mine, shared)]  # 6 jobs, 4 entries
    seen: list[int] = []

    def progress(items: list) -> list:
        seen.append(len(items))
        return items

    first = fill_entries(jobs, progress=progress)
    again = fill_entries(jobs, progress=progress)
    assert seen == [4, 4] and (first.computed, first.reused) == (4, 0) and (again.computed, again.reused) == (0, 4)
