"""Lazy TensorFlow import with the legacy Keras that tensorflow-model-optimization needs."""

from __future__ import annotations

import os
from types import ModuleType


def import_tf() -> tuple[ModuleType, ModuleType]:
    """Import TensorFlow and tf-keras on first use, never at module import time.

    Returns:
        The ``tensorflow`` and ``tf_keras`` modules.
    """
    # tfmot only understands tf-keras models; this must be set before TensorFlow is imported.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf_keras

    return tf, tf_keras
