"""User-facing errors.

Anything the user can fix (bad path, wrong format, unknown stage...) is raised as a
`TracerError`; the CLI prints its message on one line and exits with code 2. Everything
else is a bug in the tool and keeps its traceback.
"""


class TracerError(Exception):
    """An input or usage error explained in one line; CLI exit code 2."""
