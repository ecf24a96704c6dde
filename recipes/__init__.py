"""Runnable recipes composed from qflux's records and pure functions (the library never imports these)."""

from qflux.train.console import quiet_known_warnings

quiet_known_warnings()  # before any recipe imports diffusers (which imports torchao when it is installed)

import qflux.toy  # noqa: E402, F401  (registers the toy world's datasets, builtin:toy-<edit>)
