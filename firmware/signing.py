"""Ed25519 signing of OTA manifests: the server's signer, the device's key ring, key files.

The server signs each manifest's canonical bytes (``firmware.ota.Manifest.signed_bytes``) with a
private key known by a short key id; every device holds a :class:`KeyRing` of trusted public keys
by key id, with revoked ids that it refuses even when the key is still present. Ed25519
signatures are deterministic, so the same key and manifest always give the same 64 bytes (the
committed C test vectors rely on it).

Key files: the private key is PKCS#8 PEM written with mode 0600 (and refused when group or
others can read it, as ssh does); public keys are SubjectPublicKeyInfo PEM; a key ring is JSON
``{"keys": {"<key id>": "<raw public key, hex>"}, "revoked": ["<key id>", ...]}``.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tinymlops.errors import TinyMLOpsError
from tinymlops.files import write_file_atomic

KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
KEY_DIR = "keys"
PRIVATE_KEY_FILE = "ota_signing_key.pem"
KEYRING_FILE = "ota_keyring.json"


class SigningError(TinyMLOpsError):
    """A key, key file or signature is invalid."""


class UnknownKeyError(SigningError):
    """The key id is not in the device's key ring."""


class RevokedKeyError(SigningError):
    """The key id has been revoked."""


class BadSignatureError(SigningError):
    """The signature does not verify with the named key."""


def check_key_id(key_id: str) -> str:
    """Return ``key_id`` if it is 1-32 characters of ``A-Z a-z 0-9 . _ -``.

    Raises:
        SigningError: The id is malformed.
    """
    if not KEY_ID_PATTERN.match(key_id):
        raise SigningError(f"invalid key id {key_id!r}: expected 1-32 characters of A-Z a-z 0-9 . _ -")
    return key_id


def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """Generate a new Ed25519 key pair."""
    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


def private_key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    """Derive a private key from a 32-byte seed (deterministic keys for test vectors).

    Raises:
        SigningError: The seed is not 32 bytes.
    """
    if len(seed) != 32:
        raise SigningError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key (of a private key: its public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """Build a public key from its raw 32 bytes.

    Raises:
        SigningError: Not 32 bytes.
    """
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SigningError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key: a default key id."""
    return hashlib.sha256(public_key_bytes(key)).hexdigest()[:16]


def save_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write the private key as unencrypted PKCS#8 PEM, readable by the owner only (0600)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_file_atomic(path, pem, 0o600)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a private key written by :func:`save_private_key`.

    Raises:
        SigningError: The file is missing, readable by group or others, or not an Ed25519 key.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read private key {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise SigningError(f"private key {path} has permissions {mode:04o}, too open: expected 0600")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, expected an Ed25519 private key")
    return key


def save_public_key(path: Path, key: Ed25519PublicKey | Ed25519PrivateKey) -> None:
    """Write the public key (of a private key: its public half) as SubjectPublicKeyInfo PEM."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_file_atomic(path, pem, 0o644)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a public key written by :func:`save_public_key`.

    Raises:
        SigningError: The file is missing or not an Ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise SigningError(f"cannot read public key {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SigningError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, expected an Ed25519 public key")
    return key


def default_private_key_path(data_dir: Path) -> Path:
    """Where the server's OTA signing key lives by default: ``<data_dir>/keys/ota_signing_key.pem``."""
    return data_dir / KEY_DIR / PRIVATE_KEY_FILE


def default_keyring_path(data_dir: Path) -> Path:
    """Where simulated devices read their key ring by default: ``<data_dir>/keys/ota_keyring.json``."""
    return data_dir / KEY_DIR / KEYRING_FILE


class ManifestSigner:
    """The server's signer: one private key and the key id devices know it by.

    Args:
        private_key: The Ed25519 private key.
        key_id: Id written into each manifest (1-32 characters of ``A-Z a-z 0-9 . _ -``).
    """

    def __init__(self, private_key: Ed25519PrivateKey, key_id: str) -> None:
        self.key_id = check_key_id(key_id)
        self._private_key = private_key

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public half, for device key rings."""
        return self._private_key.public_key()

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``message``."""
        return self._private_key.sign(message)

    @classmethod
    def from_file(cls, path: Path, key_id: str) -> ManifestSigner:
        """Load the private key from ``path`` (see :func:`load_private_key`)."""
        return cls(load_private_key(path), key_id)


class KeyRing:
    """The device's trusted public keys by key id, and the revoked ids.

    Args:
        keys: Trusted keys by id.
        revoked: Ids never accepted again, even while their key is still listed.
    """

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None, revoked: Iterable[str] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._revoked: set[str] = set()
        for key_id, key in (keys or {}).items():
            self.add(key_id, key)
        for key_id in revoked:
            self.revoke(key_id)

    def add(self, key_id: str, key: Ed25519PublicKey) -> None:
        """Trust ``key`` under ``key_id`` (replacing a key of that id)."""
        self._keys[check_key_id(key_id)] = key

    def revoke(self, key_id: str) -> None:
        """Never accept ``key_id`` again."""
        self._revoked.add(check_key_id(key_id))

    @property
    def key_ids(self) -> list[str]:
        """Ids that verify signatures: trusted and not revoked, sorted."""
        return sorted(k for k in self._keys if k not in self._revoked)

    @property
    def revoked(self) -> list[str]:
        """Revoked ids, sorted."""
        return sorted(self._revoked)

    def verify(self, key_id: str, message: bytes, signature: bytes) -> None:
        """Check that ``signature`` is the named key's signature of ``message``.

        Raises:
            RevokedKeyError: The key id is revoked (checked first).
            UnknownKeyError: The key id is not trusted.
            BadSignatureError: The signature does not verify.
        """
        if key_id in self._revoked:
            raise RevokedKeyError(f"key id {key_id!r} is revoked")
        key = self._keys.get(key_id)
        if key is None:
            raise UnknownKeyError(f"key id {key_id!r} is not in the key ring (trusted: {', '.join(self.key_ids)})")
        if len(signature) != SIGNATURE_BYTES:
            raise BadSignatureError(f"signature is {len(signature)} bytes, Ed25519 needs {SIGNATURE_BYTES}")
        try:
            key.verify(signature, message)
        except InvalidSignature:
            raise BadSignatureError(f"signature does not verify with key {key_id!r}") from None

    def to_json(self) -> str:
        """The key ring as JSON: raw public keys in hex, revoked ids."""
        return json.dumps(
            {"keys": {k: public_key_bytes(v).hex() for k, v in sorted(self._keys.items())}, "revoked": self.revoked},
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> KeyRing:
        """Parse :meth:`to_json` output.

        Raises:
            SigningError: The JSON is malformed or a key is invalid.
        """
        try:
            data = json.loads(text)
            keys = {str(k): public_key_from_bytes(bytes.fromhex(v)) for k, v in data["keys"].items()}
            revoked = [str(k) for k in data.get("revoked", [])]
        except (ValueError, KeyError, TypeError, AttributeError, SigningError) as exc:
            raise SigningError(f"invalid key ring JSON: {type(exc).__name__}: {exc}") from None
        return cls(keys, revoked)

    def save(self, path: Path) -> None:
        """Write the key ring JSON (public data: mode 0644)."""
        write_file_atomic(path, self.to_json().encode(), 0o644)

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        """Read a key ring written by :meth:`save`.

        Raises:
            SigningError: The file is missing or invalid.
        """
        try:
            text = path.read_text()
        except OSError as exc:
            raise SigningError(f"cannot read key ring {path}: {exc.strerror or exc}") from None
        return cls.from_json(text)
