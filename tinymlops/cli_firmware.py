"""``tinymlops firmware ...``: the Cortex-M firmware images, built with arm-none-eabi-gcc for the QEMU boards.

A Typer sub-app, mounted by the main CLI (``app.add_typer(firmware_app, name="firmware")``). A
missing toolchain is a :class:`~firmware.emulator.ToolchainMissingError`, which the main CLI
reports as one line naming the Debian package, with a non-zero exit.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from tinymlops.terminal import make_console

firmware_app = typer.Typer(
    help="Cortex-M firmware images for the emulated boards (QEMU): build and size.", no_args_is_help=True
)
console = make_console()


@firmware_app.command("build")
def build(
    board: Annotated[
        list[str] | None, typer.Option("--board", help="Board to build for (repeatable; default: all boards).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sizes as JSON instead of a table.")] = False,
) -> None:
    """Build the images of each board and report their flash and RAM from the linked ELF."""
    from firmware.emulator import BOARDS, build_images, get_board, image_size

    boards = [get_board(name) for name in board] if board else list(BOARDS.values())
    built = [(target, image, elf, image_size(elf)) for target in boards
             for image, elf in build_images(target).images().items()]  # fmt: skip
    if as_json:
        rows = [{"board": target.name, "core": target.core, "image": image, "elf": str(elf), **asdict(size)}
                for target, image, elf, size in built]  # fmt: skip
        console.print_json(json.dumps(rows))
        return
    table = Table(title="Firmware images, KiB (static RAM: .data + .bss; the stack is reserved on top)")
    for column in ("board", "core", "image", "flash", "static RAM", "stack", "RAM linked"):
        table.add_column(column, justify="left" if column in ("board", "core", "image") else "right")
    for target, image, _, size in built:
        kib = (_kib(n) for n in (size.flash_bytes, size.ram_bytes, size.stack_bytes, size.ram_linked))
        table.add_row(target.name, target.core, image, *kib)
    console.print(table)


def _kib(n_bytes: int) -> str:
    return f"{n_bytes / 1024:,.1f}"
