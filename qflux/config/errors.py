"""The one exception type qflux raises for problems a user can fix (paths, configs, data), and the
import of optional extras that raises it."""

import importlib
from typing import Any


class QfluxError(Exception):
    """A user-facing error: its message says what was expected and how to fix it.

    Recipes print the message alone (no traceback) and exit with status 2.
    """


def optional(module: str, *, extra: str, needed_by: str, otherwise: str) -> Any:
    """Import an optional dependency, or stop with the sentence that names its extra.

    Args:
        module: what to import (``"bitsandbytes"``, ``"torchao.float8.float8_utils"``).
        extra: the qflux extra that installs it (``"4bit"``).
        needed_by: the setting that needs it, as the user wrote it.
        otherwise: the config change that avoids it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise QfluxError(
            f"{needed_by} needs {top}: pip install 'qflux[{extra}]' (or pip install {top}), or {otherwise}"
        ) from e
