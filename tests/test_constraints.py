"""CI installs pinned versions: every requirement and extra of setup.cfg has a == line in constraints.txt."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names(block: str) -> set[str]:
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    return {re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower() for line in lines}


def test_every_requirement_and_extra_is_pinned() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    wanted = _names(cfg["options"]["install_requires"])
    for extra in cfg["options.extras_require"].values():
        wanted |= _names(extra)
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not pinned with =="
            pins[name.strip().lower()] = version
    assert not wanted - set(pins), sorted(wanted - set(pins))
    assert pins["torch"] == "2.13.0"
