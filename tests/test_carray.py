from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from firmware.carray import CArrayError, model_to_c, write_c_files
from tests.int8_model import int8_autoencoder

MAIN_C = """\
#include <stdint.h>
#include <stdio.h>
#include "ae_v3_model_data.h"

int main(void) {
  unsigned long sum = 0;
  for (unsigned int i = 0; i < g_ae_v3_model_data_size; ++i) sum += g_ae_v3_model_data[i];
  printf("%u %lu %lu\\n", g_ae_v3_model_data_size, sum, (unsigned long)((uintptr_t)g_ae_v3_model_data % 16));
  return 0;
}
"""


@pytest.fixture(scope="module")
def model() -> bytes:
    return int8_autoencoder()


@pytest.fixture
def gcc() -> str:
    path = shutil.which("gcc")
    if path is None:
        pytest.skip("gcc is not installed")
    return path


def _parse_array(source: str, symbol: str) -> bytes:
    body = re.search(rf"alignas\(16\) const unsigned char {symbol}\[\] = \{{(.*?)\}};", source, re.S)
    assert body is not None
    return bytes(int(token, 16) for token in re.findall(r"0x([0-9a-f]{2})", body.group(1)))


def test_source_holds_the_model_bytes_and_size(model: bytes) -> None:
    source, header = model_to_c(model, "ae_v3")
    assert _parse_array(source, "g_ae_v3_model_data") == model
    assert f"const unsigned int g_ae_v3_model_data_size = {len(model)}u;" in source
    assert '#include "ae_v3_model_data.h"' in source
    assert "extern const unsigned char g_ae_v3_model_data[];" in header
    assert "extern const unsigned int g_ae_v3_model_data_size;" in header
    assert header.count("G_AE_V3_MODEL_DATA_H_") == 3  # ifndef, define, closing comment
    digest = hashlib.sha256(model).hexdigest()
    for text in (source, header):
        assert f"sha256 {digest}" in text and "Do not edit" in text


def test_generated_files_compile_link_and_read_back(model: bytes, gcc: str, tmp_path: Path) -> None:
    source_path, header_path = write_c_files(model, "ae_v3", tmp_path / "generated")
    assert (source_path.name, header_path.name) == ("ae_v3_model_data.c", "ae_v3_model_data.h")
    flags = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"]
    subprocess.run([gcc, *flags, "-c", str(source_path), "-o", str(tmp_path / "model.o")], check=True)
    main = tmp_path / "main.c"
    main.write_text(MAIN_C)
    exe = tmp_path / "check"
    subprocess.run([gcc, *flags, f"-I{source_path.parent}", str(main), str(source_path), "-o", str(exe)], check=True)
    size, checksum, misalignment = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    assert (int(size), int(checksum), int(misalignment)) == (len(model), sum(model), 0)


def test_header_is_usable_from_cpp(model: bytes, tmp_path: Path) -> None:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed")
    _, header_path = write_c_files(model, "ae_v3", tmp_path)
    use = tmp_path / "use.cc"
    use.write_text('#include "ae_v3_model_data.h"\nunsigned int model_size() { return g_ae_v3_model_data_size; }\n')
    flags = ["-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{header_path.parent}"]
    subprocess.run([gxx, *flags, "-c", str(use), "-o", str(tmp_path / "use.o")], check=True)
    symbols = subprocess.run(["nm", str(tmp_path / "use.o")], check=True, capture_output=True, text=True).stdout
    assert "U g_ae_v3_model_data_size" in symbols  # C linkage: the name is not mangled


@pytest.mark.parametrize("name", ["", "1model", "my-model", "a b", "model.v2", "naïve", "trailing_newline\n"])
def test_bad_name_raises(model: bytes, name: str) -> None:
    with pytest.raises(CArrayError, match="not a C identifier"):
        model_to_c(model, name)


def test_empty_model_raises() -> None:
    with pytest.raises(CArrayError, match="empty"):
        model_to_c(b"", "ae")
