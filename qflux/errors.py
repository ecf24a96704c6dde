"""The one exception type qflux raises for problems a user can fix (paths, configs, data)."""


class QfluxError(Exception):
    """A user-facing error: its message says what was expected and how to fix it.

    Recipes print the message alone (no traceback) and exit with status 2.
    """
