"""Small file helpers shared by the layers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary sibling created with ``mode``, then rename it over ``path``.

    The file never exists with looser permissions than ``mode``, and a reader never sees half of it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
