from __future__ import annotations

import stat
from pathlib import Path

import pytest

from firmware.signing import (
    BadSignatureError,
    KeyRing,
    ManifestSigner,
    RevokedKeyError,
    SigningError,
    UnknownKeyError,
    check_key_id,
    generate_keypair,
    key_fingerprint,
    load_private_key,
    load_public_key,
    private_key_from_seed,
    public_key_bytes,
    public_key_from_bytes,
    save_private_key,
    save_public_key,
)

MESSAGE = b"manifest canonical bytes"


def test_signature_verifies_only_for_the_same_bytes_and_key() -> None:
    private, public = generate_keypair()
    signer = ManifestSigner(private, "ops-1")
    ring = KeyRing({"ops-1": public})
    signature = signer.sign(MESSAGE)
    assert len(signature) == 64
    ring.verify("ops-1", MESSAGE, signature)
    with pytest.raises(BadSignatureError, match="ops-1"):
        ring.verify("ops-1", MESSAGE + b"!", signature)
    with pytest.raises(BadSignatureError):
        ring.verify("ops-1", MESSAGE, bytes([signature[0] ^ 1]) + signature[1:])
    with pytest.raises(BadSignatureError, match="63 bytes"):
        ring.verify("ops-1", MESSAGE, signature[:-1])
    other = ManifestSigner(generate_keypair()[0], "ops-1")
    with pytest.raises(BadSignatureError):
        ring.verify("ops-1", MESSAGE, other.sign(MESSAGE))


def test_unknown_and_revoked_key_ids_are_refused() -> None:
    private, public = generate_keypair()
    signer = ManifestSigner(private, "ops-1")
    ring = KeyRing({"ops-1": public})
    with pytest.raises(UnknownKeyError, match=r"'ops-2'.*ops-1"):
        ring.verify("ops-2", MESSAGE, signer.sign(MESSAGE))
    ring.revoke("ops-1")
    # revoked wins even though the key is still listed and the signature is good
    with pytest.raises(RevokedKeyError, match="revoked"):
        ring.verify("ops-1", MESSAGE, signer.sign(MESSAGE))
    assert ring.key_ids == [] and ring.revoked == ["ops-1"]


def test_signatures_are_deterministic_from_a_seed() -> None:
    a = ManifestSigner(private_key_from_seed(bytes(range(32))), "k")
    b = ManifestSigner(private_key_from_seed(bytes(range(32))), "k")
    assert a.sign(MESSAGE) == b.sign(MESSAGE)
    assert public_key_bytes(a.public_key) == public_key_bytes(b.public_key)
    with pytest.raises(SigningError, match="32 bytes"):
        private_key_from_seed(b"short")


def test_private_key_file_is_owner_only_and_round_trips(tmp_path: Path) -> None:
    private, _ = generate_keypair()
    path = tmp_path / "keys" / "ota.pem"
    save_private_key(path, private)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_private_key(path)
    assert loaded.sign(MESSAGE) == private.sign(MESSAGE)
    # overwriting keeps the mode; a file others can read is refused
    save_private_key(path, generate_keypair()[0])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    with pytest.raises(SigningError, match="0644, too open"):
        load_private_key(path)
    with pytest.raises(SigningError, match="cannot read"):
        load_private_key(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    with pytest.raises(SigningError, match="not an unencrypted PEM"):
        load_private_key(garbage)


def test_public_key_export(tmp_path: Path) -> None:
    private, public = generate_keypair()
    path = tmp_path / "ota.pub"
    save_public_key(path, private)
    assert public_key_bytes(load_public_key(path)) == public_key_bytes(public)
    assert public_key_bytes(public_key_from_bytes(public_key_bytes(public))) == public_key_bytes(public)
    assert key_fingerprint(private) == key_fingerprint(public) and len(key_fingerprint(public)) == 16
    priv_path = tmp_path / "ota.pem"
    save_private_key(priv_path, private)
    with pytest.raises(SigningError):
        load_public_key(priv_path)
    with pytest.raises(SigningError, match="32 bytes"):
        public_key_from_bytes(b"\x00" * 31)


def test_keyring_json_round_trip(tmp_path: Path) -> None:
    (p1, k1), (p2, k2) = generate_keypair(), generate_keypair()
    ring = KeyRing({"a": k1, "b": k2}, revoked=["a"])
    path = tmp_path / "ring.json"
    ring.save(path)
    loaded = KeyRing.load(path)
    assert loaded.key_ids == ["b"] and loaded.revoked == ["a"]
    loaded.verify("b", MESSAGE, ManifestSigner(p2, "b").sign(MESSAGE))
    with pytest.raises(RevokedKeyError):
        loaded.verify("a", MESSAGE, ManifestSigner(p1, "a").sign(MESSAGE))
    for bad in ("{", '{"keys": {"a": "zz"}}', '{"keys": {"a": "00"}}', "[]"):
        with pytest.raises(SigningError, match="invalid key ring"):
            KeyRing.from_json(bad)


@pytest.mark.parametrize("key_id", ["", "a b", "x" * 33, "ключ", "a/b"])
def test_invalid_key_ids_are_refused(key_id: str) -> None:
    with pytest.raises(SigningError, match="invalid key id"):
        check_key_id(key_id)
    with pytest.raises(SigningError):
        ManifestSigner(generate_keypair()[0], key_id)
