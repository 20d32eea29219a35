"""The MCU target catalog: memory, clock and cost figures of each board a model is built for.

The catalog is committed YAML (``data/mcu_targets.yaml`` by default, see
``Settings.targets.catalog``), one mapping per target under ``targets:``, keyed by its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from tinymlops.errors import ConfigError
from tinymlops.settings import get_settings


class McuTarget(BaseModel):
    """One MCU target. Sizes in bytes; cycle figures are engineering estimates (see the catalog)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]*$", description="Catalog key, lower case.")
    description: str = Field(min_length=1, description="Board or module in words.")
    core: str = Field(min_length=1, description="CPU core, e.g. Arm Cortex-M4F.")
    clock_hz: int = Field(gt=0, description="CPU clock.")
    sram_bytes: int = Field(gt=0, description="On-chip SRAM.")
    flash_bytes: int = Field(gt=0, description="Program flash (internal or the module's external flash).")
    firmware_flash_reserve_bytes: int = Field(ge=0, description="Flash for bootloader, application, RTOS, MQTT.")
    runtime_flash_bytes: int = Field(ge=0, description="Flash for the TFLite Micro runtime and its kernels.")
    ram_reserve_bytes: int = Field(ge=0, description="RAM for the RTOS, stacks and network buffers.")
    cycles_per_mac_int8: float = Field(gt=0, description="CPU cycles per int8 MAC, reference kernels.")
    cycles_per_mac_int8_cmsis_nn: float = Field(gt=0, description="CPU cycles per int8 MAC, optimised kernels.")
    uses_optimized_kernels: bool = Field(description="Whether the firmware links the optimised kernels.")
    dsp_cycles_per_sample: float = Field(ge=0, description="DSP front-end cycles per input sample, FFT included.")
    latency_budget_ms: float = Field(gt=0, description="Budget for DSP plus one inference per window.")
    emulated_board: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="QEMU board that runs this core (firmware/emulator.py); None: latency is estimated.",
    )
    cycles_per_instruction: float = Field(default=1.0, gt=0, description="Cycles per measured instruction.")
    dsp_arithmetic: Literal["f32", "q15"] = Field(
        default="f32", description="DSP front end: float (FPU cores) or fixed point (cores without an FPU)."
    )

    @pydantic.model_validator(mode="after")
    def _reserves_fit(self) -> McuTarget:
        if self.firmware_flash_reserve_bytes + self.runtime_flash_bytes >= self.flash_bytes:
            raise ValueError("firmware_flash_reserve_bytes + runtime_flash_bytes leave no flash for a model")
        if self.ram_reserve_bytes >= self.sram_bytes:
            raise ValueError("ram_reserve_bytes leaves no SRAM for the tensor arena")
        return self

    @property
    def cycles_per_mac(self) -> float:
        """Cycles per int8 MAC of the kernels this target's firmware uses."""
        return self.cycles_per_mac_int8_cmsis_nn if self.uses_optimized_kernels else self.cycles_per_mac_int8


def _describe_errors(exc: pydantic.ValidationError) -> str:
    """Describe a pydantic error in a few words: ``field 'clock_hz' is missing``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "missing":
            parts.append(f"field '{where}' is missing")
        elif error["type"] == "extra_forbidden":
            parts.append(f"field '{where}' is not a known field")
        elif where:
            parts.append(f"field '{where}' is invalid ({error['msg']}, got {error.get('input')!r})")
        else:
            parts.append(error["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


def load_catalog(path: Path | None = None) -> dict[str, McuTarget]:
    """Load and validate the MCU target catalog.

    Args:
        path: Catalog YAML; default ``get_settings().targets.catalog``.

    Returns:
        Targets by name, in file order.

    Raises:
        ConfigError: The file is missing or invalid; the message names the file, target and field.

    """
    path = path or get_settings().targets.catalog
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"MCU target catalog {path} cannot be read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"MCU target catalog {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    entries = data.get("targets") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"MCU target catalog {path} needs a non-empty 'targets:' mapping of name -> fields")
    catalog: dict[str, McuTarget] = {}
    for name, fields in entries.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"MCU target catalog {path}: target '{name}' must be a mapping of fields")
        if "name" in fields and fields["name"] != name:
            raise ConfigError(f"MCU target catalog {path}: target '{name}' has a different name {fields['name']!r}")
        try:
            catalog[str(name)] = McuTarget.model_validate({**fields, "name": name})
        except pydantic.ValidationError as exc:
            raise ConfigError(f"MCU target catalog {path}: target '{name}': {_describe_errors(exc)}") from exc
    return catalog


def get_target(name: str, catalog: Mapping[str, McuTarget] | None = None) -> McuTarget:
    """Return one target by name (from ``catalog``, default the settings' catalog).

    Raises:
        ConfigError: The name is not in the catalog; the message lists the known names.

    """
    targets = load_catalog() if catalog is None else catalog
    try:
        return targets[name]
    except KeyError:
        raise ConfigError(f"unknown MCU target {name!r}; known targets: {', '.join(sorted(targets))}") from None
