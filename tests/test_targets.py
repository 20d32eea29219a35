from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tinymlops.errors import ConfigError
from tinymlops.settings import get_settings, reset_settings
from tinymlops.targets import McuTarget, get_target, load_catalog

# Datasheet figures the committed catalog must carry.
EXPECTED = {
    "nrf52840": (64_000_000, 256 * 1024, 1024 * 1024),
    "stm32l4r5": (120_000_000, 640 * 1024, 2 * 1024 * 1024),
    "esp32s3": (240_000_000, 512 * 1024, 8 * 1024 * 1024),
    "rp2040": (133_000_000, 264 * 1024, 2 * 1024 * 1024),
}


def _committed_entries() -> dict[str, dict[str, object]]:
    return yaml.safe_load(get_settings().targets.catalog.read_text())["targets"]


def _write(tmp_path: Path, entries: dict[str, dict[str, object]]) -> Path:
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump({"targets": entries}))
    return path


def test_committed_catalog_has_the_four_targets_with_datasheet_figures() -> None:
    catalog = load_catalog()
    assert set(EXPECTED) <= set(catalog)
    for name, (clock, sram, flash) in EXPECTED.items():
        target = catalog[name]
        assert (target.name, target.clock_hz, target.sram_bytes, target.flash_bytes) == (name, clock, sram, flash)
        assert target.cycles_per_mac_int8_cmsis_nn <= target.cycles_per_mac_int8
        expected_cpm = (
            target.cycles_per_mac_int8_cmsis_nn if target.uses_optimized_kernels else target.cycles_per_mac_int8
        )
        assert target.cycles_per_mac == expected_cpm
    assert catalog["rp2040"].core == "Arm Cortex-M0+"
    assert not catalog["rp2040"].uses_optimized_kernels
    assert all(name in catalog for name in get_settings().targets.default)


def test_catalog_path_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = {"only_one": _committed_entries()["nrf52840"]}
    monkeypatch.setenv("TINYMLOPS_TARGETS__CATALOG", str(_write(tmp_path, entries)))
    reset_settings()
    try:
        assert list(load_catalog()) == ["only_one"]
        assert get_target("only_one").clock_hz == 64_000_000
    finally:
        reset_settings()


def test_missing_field_names_file_target_and_field(tmp_path: Path) -> None:
    entries = _committed_entries()
    del entries["stm32l4r5"]["clock_hz"]
    path = _write(tmp_path, entries)
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "'stm32l4r5'" in message and "'clock_hz' is missing" in message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("sram_bytes", -1, "'sram_bytes' is invalid"),
        ("cycles_per_mac_int8", "fast", "'cycles_per_mac_int8' is invalid"),
        ("flash_byts", 1, "'flash_byts' is not a known field"),
        ("ram_reserve_bytes", 10**9, "ram_reserve_bytes leaves no SRAM"),
    ],
)
def test_invalid_field_is_named(tmp_path: Path, field: str, value: object, expected: str) -> None:
    entries = _committed_entries()
    entries["rp2040"][field] = value
    with pytest.raises(ConfigError, match="target 'rp2040'") as info:
        load_catalog(_write(tmp_path, entries))
    assert expected in str(info.value)


def test_bad_files_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_catalog(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("targets: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_catalog(broken)
    assert "\n" not in str(info.value)
    no_targets = tmp_path / "empty.yaml"
    no_targets.write_text("nrf52840: {}\n")
    with pytest.raises(ConfigError, match="'targets:' mapping"):
        load_catalog(no_targets)
    bad_name = _write(tmp_path, {"Bad-Name": _committed_entries()["nrf52840"]})
    with pytest.raises(ConfigError, match=r"'Bad-Name'.*'name' is invalid"):
        load_catalog(bad_name)


def test_unknown_target_lists_known_names() -> None:
    catalog = load_catalog()
    with pytest.raises(ConfigError) as info:
        get_target("nrf5340", catalog)
    message = str(info.value)
    assert "'nrf5340'" in message
    assert all(name in message for name in catalog)
    assert isinstance(get_target("nrf52840", catalog), McuTarget)
