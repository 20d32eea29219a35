"""Domain errors. Every message is one line that names what is wrong."""

from tinymlops.contracts.errors import TinyMLOpsError

__all__ = [
    "BrokerError",
    "ConfigError",
    "DataImportError",
    "DecodeError",
    "LakeError",
    "LeaseError",
    "TinyMLOpsError",
    "ValidationError",
]


class ConfigError(TinyMLOpsError):
    """Settings or committed configuration are invalid."""


class DecodeError(TinyMLOpsError):
    """Bytes from the network do not form a valid message."""


class ValidationError(TinyMLOpsError):
    """A decoded message is well-formed but violates a data-quality rule."""


class DataImportError(TinyMLOpsError):
    """A recorded file cannot be imported into the lake."""


class LakeError(TinyMLOpsError):
    """The data lake cannot be read or written."""


class BrokerError(TinyMLOpsError):
    """No MQTT broker could be reached or started."""


class LeaseError(TinyMLOpsError):
    """Another live process holds the lease for this work (a second ingest of the same fleet)."""
