"""The base of every domain error: its message is one line that names what is wrong."""


class TinyMLOpsError(Exception):
    """Base class for errors the CLI reports as one line and a non-zero exit."""
