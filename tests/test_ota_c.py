"""The MCU's OTA receiver in C against the Python receiver: same bytes in, same decisions and model out."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from firmware.ota import vector_files, write_test_vectors
from tinymlops.settings import REPO_ROOT

C_DIR = REPO_ROOT / "firmware" / "c"
VECTORS = C_DIR / "vectors"
BINARY = C_DIR / "build" / "test_ota_receiver"


@pytest.fixture(scope="module")
def make_test() -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.fail("make and gcc are needed for the C receiver (Debian: apt-get install build-essential)")
    return subprocess.run(["make", "-C", str(C_DIR), "test"], capture_output=True, text=True, timeout=120, check=False)


def test_committed_vectors_are_what_python_writes_now(tmp_path: Path) -> None:
    written = write_test_vectors(tmp_path)
    assert {p.name for p in written} == set(vector_files(VECTORS))
    fresh, committed = vector_files(tmp_path), vector_files(VECTORS)
    changed = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not changed, f"regenerate with firmware.ota.write_test_vectors(Path('firmware/c/vectors')): {changed}"


def test_c_receiver_replays_the_python_transcript(make_test: subprocess.CompletedProcess[str]) -> None:
    assert make_test.returncode == 0, make_test.stdout[-2000:] + make_test.stderr[-2000:]
    summary = re.search(r"(\d+) passed, (\d+) failed", make_test.stdout)
    assert summary is not None, make_test.stdout[-2000:]
    script_lines = (VECTORS / "script.txt").read_text().splitlines()
    checked = {"manifest", "chunk", "finish", "missing", "request", "image", "crc", "sha256", "limit"}
    checks = sum(line.split()[0] in checked for line in script_lines)
    assert int(summary.group(2)) == 0 and int(summary.group(1)) >= checks > 50


def test_c_receiver_fails_on_a_wrong_expectation(make_test: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    """The replay really compares: one changed expectation, or one changed model byte, fails it."""
    assert make_test.returncode == 0
    vectors = tmp_path / "vectors"
    shutil.copytree(VECTORS, vectors)
    script = (vectors / "script.txt").read_text()
    (vectors / "script.txt").write_text(script.replace("chunk_bad_crc.bin ERR_CRC", "chunk_bad_crc.bin OK"))
    result = subprocess.run([str(BINARY), str(vectors)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "1 failed" in result.stdout and "chunk_bad_crc.bin" in result.stderr
    (vectors / "script.txt").write_text(script)
    model = bytearray((vectors / "model.bin").read_bytes())
    model[1234] ^= 1
    (vectors / "model.bin").write_bytes(bytes(model))
    result = subprocess.run([str(BINARY), str(vectors)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "image model.bin" in result.stderr and "sha256 model.bin" in result.stderr
