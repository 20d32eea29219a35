"""The OTA signing key store: created once outside the repository, 0600, rotation and revocation in the key ring."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from firmware.signing import KeyRing, RevokedKeyError, UnknownKeyError, load_private_key, public_key_bytes
from tasks.deploy import KEYS_DIR_ENV, KeyStore, KeyStoreError
from tinymlops.cli_deploy import keys_app
from tinymlops.settings import REPO_ROOT, get_settings, reset_settings


@pytest.fixture
def key_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = tmp_path / "secrets" / "keys"
    monkeypatch.setenv(KEYS_DIR_ENV, str(directory))
    monkeypatch.setenv("TINYMLOPS_DATA_DIR", str(tmp_path / "data"))
    reset_settings()
    yield directory
    reset_settings()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_location_is_outside_the_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(KEYS_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert get_settings().resolved_keys_dir == tmp_path / "config" / "tinymlops" / "keys"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert get_settings().resolved_keys_dir == Path.home() / ".config" / "tinymlops" / "keys"
    inside = REPO_ROOT / "data" / "keys-test"
    with pytest.raises(KeyStoreError, match="inside the repository"):
        KeyStore(inside)
    assert not inside.exists()


def test_init_creates_a_0600_key_once_and_never_overwrites(key_dir: Path) -> None:
    store = KeyStore(get_settings().resolved_keys_dir)
    info, created = store.init("ops-1")
    assert created and info.key_id == "ops-1" and info.state == "signing"
    assert mode(store.private_key_path) == 0o600 and mode(key_dir) == 0o700
    assert not store.private_key_path.resolve().is_relative_to(REPO_ROOT)
    pem = store.private_key_path.read_bytes()
    ring = KeyRing.load(store.keyring_path)
    assert ring.key_ids == ["ops-1"] and ring.revoked == []
    signer = store.signer()
    ring.verify("ops-1", b"manifest", signer.sign(b"manifest"))  # the ring's key is the private key's half

    again, created = KeyStore(get_settings().resolved_keys_dir).init("ops-other")
    assert not created and again.key_id == "ops-1"
    assert store.private_key_path.read_bytes() == pem  # not overwritten

    store.private_key_path.chmod(0o644)
    with pytest.raises(KeyStoreError, match="too open"):
        store.signer()


def test_rotate_keeps_the_old_key_trusted_until_revoked(key_dir: Path) -> None:
    store = KeyStore(key_dir)
    store.init("ops-1")
    old = store.signer()
    new = store.rotate("ops-2")
    assert new.key_id == "ops-2" and store.signer().key_id == "ops-2"
    assert public_key_bytes(load_private_key(store.private_key_path)) == public_key_bytes(store.signer().public_key)
    ring = store.keyring()
    assert ring.key_ids == ["ops-1", "ops-2"]
    ring.verify("ops-1", b"m", old.sign(b"m"))  # still trusted after rotation
    assert [(k.key_id, k.state) for k in store.list_keys()] == [("ops-2", "signing"), ("ops-1", "trusted")]
    with pytest.raises(KeyStoreError, match="already in"):
        store.rotate("ops-1")
    with pytest.raises(KeyStoreError, match="is the signing key"):
        store.revoke("ops-2")
    with pytest.raises(KeyStoreError, match="no key 'ops-9'"):
        store.revoke("ops-9")

    store.revoke("ops-1")
    ring = store.keyring()
    assert ring.key_ids == ["ops-2"] and ring.revoked == ["ops-1"]
    with pytest.raises(RevokedKeyError):
        ring.verify("ops-1", b"m", old.sign(b"m"))
    with pytest.raises(UnknownKeyError):
        ring.verify("ops-3", b"m", old.sign(b"m"))
    assert [(k.key_id, k.state) for k in store.list_keys()] == [("ops-2", "signing"), ("ops-1", "revoked")]
    exported = store.export_keyring(key_dir.parent / "device-ring.json")
    assert json.loads(exported.read_text())["revoked"] == ["ops-1"]


def test_uninitialised_store_gives_one_line_errors(key_dir: Path) -> None:
    store = KeyStore(key_dir)
    for call in (store.signer, store.keyring, lambda: store.rotate("x"), lambda: store.revoke("x")):
        with pytest.raises(KeyStoreError, match="tinymlops keys init") as info:
            call()
        assert "\n" not in str(info.value)


def test_keys_cli(key_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(keys_app, ["init", "--key-id", "cli-1"])
    assert result.exit_code == 0, result.output
    assert "created signing key cli-1" in result.output
    assert mode(key_dir / "signing_key.pem") == 0o600
    result = runner.invoke(keys_app, ["init"])
    assert result.exit_code == 0 and "already exists" in result.output and "not overwritten" in result.output

    assert runner.invoke(keys_app, ["rotate", "--key-id", "cli-2"]).exit_code == 0
    shown = json.loads(runner.invoke(keys_app, ["show", "--json"]).output)
    assert shown["directory"] == str(key_dir.resolve())
    assert [(k["key_id"], k["state"]) for k in shown["keys"]] == [("cli-2", "signing"), ("cli-1", "trusted")]

    assert runner.invoke(keys_app, ["revoke", "cli-1"]).exit_code == 0
    refused = runner.invoke(keys_app, ["revoke", "cli-2"])
    assert refused.exit_code != 0 and isinstance(refused.exception, KeyStoreError)

    out = tmp_path / "ring.json"
    assert runner.invoke(keys_app, ["export-public", "--output", str(out)]).exit_code == 0
    ring = KeyRing.load(out)
    assert ring.key_ids == ["cli-2"] and ring.revoked == ["cli-1"]
    default = runner.invoke(keys_app, ["export-public"])  # where `tinymlops device run` reads its key ring
    assert default.exit_code == 0
    assert KeyRing.load(tmp_path / "data" / "keys" / "ota_keyring.json").key_ids == ["cli-2"]
    table = runner.invoke(keys_app, ["show"])
    assert "cli-2" in table.output and "revoked" in table.output
