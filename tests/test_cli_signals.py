"""SIGTERM stops a long-running command as Ctrl-C does: every process it started is gone afterwards.

Each command runs as a real subprocess. Its process tree (children and their children, those in
sessions of their own included) is recorded once what it starts is up, then the command gets
SIGTERM and must exit within a bound, with 143, leaving none of those processes behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from firmware.emulator import EmulatorError, build_images
from tests.conftest import cli_env
from tinymlops.mqtt import MosquittoBroker, connect, make_client, parse_broker_url

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]

CLI = [sys.executable, "-m", "tinymlops"]
UP_TIMEOUT_S = 120.0  # a cold temporary Prefect server on a busy 2-core machine
EXIT_TIMEOUT_S = 60.0  # the longest orderly stop: the flow's crash report, then each service's own timeout


class Command:
    """A CLI command running in the background, its output in a file."""

    def __init__(self, args: list[str], data_dir: Path) -> None:
        self.log = data_dir / "command.log"
        self.seen: dict[int, psutil.Process] = {}  # every descendant ever listed, for the clean-up
        with self.log.open("w") as out:
            # unbuffered: the test waits for the command's console lines
            self.process = subprocess.Popen(
                [*CLI, *args], env=cli_env(data_dir, PYTHONUNBUFFERED="1"), stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def output(self) -> str:
        """Everything the command printed so far."""
        return self.log.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        """The processes it started and theirs (the parent link holds across sessions)."""
        try:
            found = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update((p.pid, p) for p in found)
        return found

    def wait_until(self, what: str, ready: Callable[[], bool]) -> None:
        """Poll ``ready`` until it holds; fail with the output when the command exits or time runs out."""
        deadline = time.monotonic() + UP_TIMEOUT_S
        while not ready():
            if self.process.poll() is not None:
                pytest.fail(f"the command exited ({self.process.returncode}) before {what}:\n{self.output}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {UP_TIMEOUT_S:.0f} s:\n{self.output}")
            time.sleep(0.5)

    def has_child(self, name: str) -> bool:
        """Whether a descendant's command line mentions ``name``."""
        return any(name in " ".join(_cmdline(p)) for p in self.descendants())


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie; ``is_running`` also checks the start time, so a reused pid is not it."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def command(tmp_path: Path) -> Iterator[Callable[[list[str]], Command]]:
    """Start CLI commands; whatever of theirs survives the test is killed by pid (a failing run)."""
    started: list[Command] = []

    def start(args: list[str]) -> Command:
        started.append(Command(args, tmp_path))
        return started[-1]

    yield start
    for cmd in started:
        cmd.descendants()
        if cmd.process.poll() is None:
            cmd.process.kill()
            cmd.process.wait()
        for process in cmd.seen.values():
            if _alive(process):
                process.kill()


def _terminate_and_check(cmd: Command, tree: list[psutil.Process]) -> None:
    """SIGTERM the command; it exits 143 within the bound and none of ``tree`` is left."""
    assert tree, "the command started no processes"
    names = {p.pid: " ".join(_cmdline(p))[:120] for p in tree}
    cmd.process.send_signal(signal.SIGTERM)
    try:
        code = cmd.process.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {EXIT_TIMEOUT_S:.0f} s after SIGTERM:\n{cmd.output}")
    deadline = time.monotonic() + 5  # an orphan init has not reaped yet
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [names[p.pid] for p in tree if _alive(p)]
    assert not left, f"left running after SIGTERM: {left}\n{cmd.output}"
    assert code == 143, cmd.output
    assert "stopped by SIGTERM" in cmd.output


def test_broker_is_announced_to_later_publishers_and_sigterm_stops_its_mosquitto(
    command: Callable[[list[str]], Command], tmp_path: Path
) -> None:
    cmd = command(["broker"])
    cmd.wait_until("broker listening", lambda: "MQTT broker listening on" in cmd.output)
    announcement = tmp_path / "broker.json"
    url = json.loads(announcement.read_text())["url"]
    assert url in cmd.output
    # `simulate` with no broker configured publishes to the announced one, where a subscriber gets the windows
    received: list[str] = []
    address = parse_broker_url(url)
    subscriber = make_client(address, "announced-broker-listener")
    subscriber.on_message = lambda _c, _u, message: received.append(message.topic)
    connect(subscriber, address)
    subscriber.subscribe("tinymlops/#", qos=1)
    try:
        simulate = subprocess.run([*CLI, "simulate", "--devices", "2", "--windows", "3", "--interval", "0"],
                                  env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)  # fmt: skip
        assert simulate.returncode == 0, simulate.stderr
        deadline = time.monotonic() + 30
        while len(received) < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len([t for t in received if t.endswith("/vibration")]) == 6, received
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()
    _terminate_and_check(cmd, cmd.descendants())
    assert not announcement.exists()  # a stopped broker is no longer announced


def test_sigterm_to_ingest_stops_its_prefect_server_and_broker(command: Callable[[list[str]], Command]) -> None:
    cmd = command(["ingest", "--fleet", "x", "--seconds", "600"])  # no PREFECT_API_URL: a temporary server
    cmd.wait_until(
        "ingest running with a temporary Prefect server and a broker",
        lambda: "ingesting tinymlops/x/" in cmd.output and cmd.has_child("uvicorn") and cmd.has_child("mosquitto"),
    )
    _terminate_and_check(cmd, cmd.descendants())


def test_sigterm_to_device_run_stops_its_qemu(
    command: Callable[[list[str]], Command], tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    try:
        image = build_images("mps2-an386").device
    except EmulatorError as exc:
        pytest.skip(f"real firmware not available: {exc}")
    if image is None:
        pytest.skip("real firmware not available: no device image")
    keygen = subprocess.run(
        [*CLI, "device", "keygen", "--key-id", "k1"], env=cli_env(tmp_path), capture_output=True, text=True
    )
    assert keygen.returncode == 0, keygen.stderr
    cmd = command(["device", "run", "--emulated", "1", "--seconds", "600", "--broker", mosquitto.address.url])
    cmd.wait_until(
        "an emulated device in QEMU",
        lambda: "emulated nrf52840 devices on" in cmd.output and cmd.has_child("qemu-system-arm"),
    )
    tree = cmd.descendants()
    assert any("qemu-system-arm" in " ".join(_cmdline(p)) for p in tree)
    _terminate_and_check(cmd, tree)
