"""Runnable recipes composed from qflux's records and pure functions (the library never imports these)."""
