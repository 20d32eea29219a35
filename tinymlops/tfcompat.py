"""Lazy, quiet TensorFlow import with the legacy Keras that tensorflow-model-optimization needs."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

_TF_NOISE = re.compile(
    r"^(?:[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]|WARNING: All log messages before absl|fully_quantize: "
    r"|To enable the following instructions|INFO: Created TensorFlow Lite)"
)


@contextmanager
def quiet_tensorflow() -> Iterator[None]:
    """Drop TensorFlow's native log lines and converter warnings written while the block runs.

    File descriptor 2 is captured for the duration; every captured line that is not TensorFlow
    noise is written back to stderr afterwards, so other output is delayed, never lost.
    """
    sys.stderr.flush()
    with tempfile.TemporaryFile() as capture, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorflow(\..*)?$")
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not _TF_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def import_tf() -> tuple[ModuleType, ModuleType]:
    """Import TensorFlow and tf-keras on first use, never at module import time, without its start-up noise.

    Returns:
        The ``tensorflow`` and ``tf_keras`` modules.
    """
    # tfmot only understands tf-keras models; this must be set before TensorFlow is imported.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_tensorflow():
        import tensorflow as tf
        import tf_keras
    tf.get_logger().setLevel(logging.ERROR)
    return tf, tf_keras
