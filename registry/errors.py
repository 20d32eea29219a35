"""Errors of the MLflow tracking and registry layer; each message is one line naming what is wrong."""

from tinymlops.errors import TinyMLOpsError


class RegistryError(TinyMLOpsError):
    """A tracking or registry operation failed."""


class RegistryUnavailableError(RegistryError):
    """The MLflow tracking server or store cannot be reached."""


class ModelNotFoundError(RegistryError):
    """A model reference names no registered model, version or alias."""


class ModelArtifactsError(RegistryError):
    """A registered version's artifacts are missing or incomplete."""


class ModelIntegrityError(RegistryError):
    """A registered model's files do not match the sha256 recorded at registration."""


class ModelInputError(RegistryError):
    """Input to a served model does not have the shape or values it needs."""


class PromotionError(RegistryError):
    """A promotion or rollback is refused; the message says which rule stopped it."""
