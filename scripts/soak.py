"""Bounded soak run: does the loop hold up for minutes under a fleet's load without growing or dropping?

One Mosquitto, 500 simulated devices (``DeviceFleet``: shared connections, real TFLite Micro)
streaming their raw windows and scoring in real time, a continuous ingest into the lake, and a
monitor run every ``--monitor-every`` seconds, each in its own process so that its resident memory
can be sampled from ``/proc/PID/status``. During the run the script trains a model on the live
windows, deploys it to every device (the devices score from then on), and later retrains and
redeploys it (the retrain flow), all through the real Prefect flows.

At the end it reports, per process, resident memory over time (after warm-up, the growth and
its slope), and the windows the devices published against the windows in the lake: a device's
sequence numbers are consecutive, so every gap or missing tail is a dropped window. Targets:
flat memory, 0 dropped.

Not part of CI (minutes of wall time, all CPU cores). Usage::

    .venv/bin/python scripts/soak.py --minutes 10
    .venv/bin/python scripts/soak.py --minutes 2 --devices 100 --out /tmp/soak

Writes ``soak_report.json`` and ``rss.csv`` in the work directory (``--out``, default a new
temporary directory, kept).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinymlops.errors import TinyMLOpsError
from tinymlops.settings import REPO_ROOT, get_settings, reset_settings

log = logging.getLogger("soak")

QUICK_TRAINING_CONFIG = REPO_ROOT / "data" / "training_quick.yaml"
DEVICE_PREFIX = "soak"
ROLES = ("devices", "ingest", "monitor")


def stop_on_sigterm() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a role finishes its work and writes its result."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (the orchestrator may be polling for it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


# --- roles: each runs in its own process -----------------------------------------------------------


def run_devices(args: argparse.Namespace) -> None:
    """The fleet: stream every window, score it once a model is active; report per-device state at the end."""
    from firmware.device import DeviceConfig
    from firmware.device_fleet import DeviceFleet
    from tasks.deploy import KeyStore
    from tinymlops.mqtt import parse_broker_url
    from tinymlops.targets import get_target

    settings = get_settings()
    stop = stop_on_sigterm()
    config = DeviceConfig(
        topic_root=settings.mqtt.topic_root, publish_windows=True, score_interval_s=args.interval, summary_windows=100
    )
    fleet = DeviceFleet(
        settings.fleet, args.devices, get_target(args.target), KeyStore(settings.resolved_keys_dir).keyring(),
        parse_broker_url(settings.mqtt.url or ""), devices_per_connection=args.per_connection, config=config,
        device_prefix=DEVICE_PREFIX, mqtt_settings=settings.mqtt,
    )  # fmt: skip
    fleet.start()
    stop.wait()
    fleet.stop()
    versions = Counter(str(d.active.manifest.model_version) if d.active else "none" for d in fleet.devices)
    write_json(
        Path(args.result),
        {
            "devices": len(fleet),
            "connections": args.devices // args.per_connection + bool(args.devices % args.per_connection),
            "active_versions": dict(versions),
            "windows_scored": sum(d.windows_scored for d in fleet.devices),
            "anomalies": sum(d.anomalies for d in fleet.devices),
        },
    )


def run_ingest_role(args: argparse.Namespace) -> None:
    """The continuous ingest (acknowledges after the write) until told to stop."""
    from tasks.ingest import ingest_config, run_ingest
    from tinymlops.mqtt import parse_broker_url

    settings = get_settings()
    stop = stop_on_sigterm()
    stats = run_ingest(parse_broker_url(settings.mqtt.url or ""), ingest_config(settings, settings.fleet), stop=stop)
    write_json(Path(args.result), stats.to_dict())


def run_monitor_role(args: argparse.Namespace) -> None:
    """Periodic monitor runs over the last ``--monitor-window`` seconds, logged to MLflow, once a champion exists."""
    from registry.errors import ModelNotFoundError
    from registry.models import resolve
    from registry.store import configure_from_settings
    from tasks.monitor import log_monitoring, monitor_fleet
    from tinymlops.schemas import registered_model_name

    settings = get_settings()
    stop = stop_on_sigterm()
    configure_from_settings(settings)
    ref = f"{registered_model_name(args.target)}@champion"
    runs = []
    while not stop.wait(args.monitor_every):
        until = dt.datetime.now(tz=dt.UTC)
        since = until - dt.timedelta(seconds=args.monitor_window)
        started = time.monotonic()
        entry: dict[str, Any] = {"at": until.isoformat(timespec="seconds")}
        try:
            with tempfile.TemporaryDirectory(prefix="soak-monitor-") as tmp:
                champion = resolve(ref, Path(tmp) / "champion")
                report = monitor_fleet(
                    settings.lake_root, settings.fleet, champion.bundle, since=since, until=until,
                    settings=settings.drift,
                )  # fmt: skip
                log_monitoring(report, champion, None)
            entry |= {"model": f"v{champion.version.version}", "verdict": report.verdict,
                      "windows": report.windows_live, "devices": len(report.devices)}  # fmt: skip
        except ModelNotFoundError:
            entry["verdict"] = "no champion yet"
        except TinyMLOpsError as exc:
            entry["error"] = str(exc)
        entry["seconds"] = round(time.monotonic() - started, 2)
        runs.append(entry)
        write_json(Path(args.result), runs)


# --- the orchestrator -----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process (VmRSS) in MB, None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Child:
    """One role's process and where it writes its result."""

    role: str
    process: subprocess.Popen[bytes]
    result: Path
    samples: list[tuple[float, float]] = field(default_factory=list)

    def stop(self, timeout_s: float = 120) -> Any:
        """SIGTERM, wait, and return its result (None if it wrote none)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: killed", self.role, timeout_s)
                self.process.kill()
                self.process.wait()
        return json.loads(self.result.read_text()) if self.result.exists() else None


class WindowObserver:
    """An independent subscriber that sees every window the devices publish (what the broker routed)."""

    def __init__(self, address: Any, topic: str) -> None:
        from firmware.codec import decode
        from tinymlops.mqtt import connect, make_client

        self._decode = decode
        self.seen: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        self.client = make_client(address, f"soak-observer-{os.getpid()}")
        self.client.on_message = self._on_message
        connect(self.client, address)
        self.client.subscribe(topic, qos=1)

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        try:
            window = self._decode(bytes(message.payload))
        except TinyMLOpsError:
            return
        with self._lock:
            self.seen.setdefault(window.device_id, set()).add(window.seq)

    def stop(self) -> dict[str, set[int]]:
        """Disconnect; return the sequence numbers seen per device."""
        self.client.disconnect()
        self.client.loop_stop()
        with self._lock:
            return {k: set(v) for k, v in self.seen.items()}


def timed(name: str, t0: float, phases: list[dict[str, Any]], action: Callable[[], dict[str, Any]]) -> None:
    """Run one phase, recording when it ran, how long it took and what it returned (or why it failed)."""
    started = time.monotonic()
    entry: dict[str, Any] = {"phase": name, "at_s": round(started - t0, 1)}
    try:
        entry.update(action())
    except Exception as exc:  # a failed phase is a finding of the soak, not the end of it
        log.exception("phase %s failed", name)
        entry["error"] = f"{type(exc).__name__}: {exc}"
    entry["seconds"] = round(time.monotonic() - started, 1)
    phases.append(entry)
    log.info("phase %s done after %.0f s%s", name, entry["seconds"], f": {entry['error']}" if "error" in entry else "")


def lifecycle(args: argparse.Namespace, broker_url: str, t0: float, deadline: float) -> list[dict[str, Any]]:
    """Train on the live windows, deploy to every device, later retrain on the recent ones and redeploy if promoted.

    The retraining is the retrain flow (cooldown claim, train on the recent windows, deploy each
    promoted champion) with the quick training configuration; it is skipped when less of the run
    is left than the first training and deployment took. Runs in the main thread (Prefect's flow
    engine expects it).
    """
    from flows.deploy import deploy_flow
    from flows.retrain import retrain_flow
    from flows.train import train_flow
    from tinymlops.schemas import registered_model_name

    settings = get_settings()
    phases: list[dict[str, Any]] = []
    total = deadline - t0
    champion = f"{registered_model_name(args.target)}@champion"
    time.sleep(max(t0 + max(20.0, 0.1 * total) - time.monotonic(), 0))  # windows to train on first

    def train(since: dt.datetime | None = None) -> dict[str, Any]:
        out = train_flow(fleet=settings.fleet, targets=[args.target], start=since,
                         config_path=str(QUICK_TRAINING_CONFIG))  # fmt: skip
        return {"registered": out["registered"], "counts": out["counts"]}

    def deploy() -> dict[str, Any]:
        out = deploy_flow(champion, fleet=settings.fleet, broker_url=broker_url, timeout_s=300)
        return {"outcome": out["outcome"], "counts": out["counts"], "latency": out["latency"]}

    def retrain() -> dict[str, Any]:
        since = dt.datetime.now(tz=dt.UTC) - dt.timedelta(seconds=max(60.0, 0.2 * total))
        out = retrain_flow(settings.fleet, since=since, targets=[args.target], broker_url=broker_url,
                           config_path=str(QUICK_TRAINING_CONFIG), reason="soak")  # fmt: skip
        if not out["retrained"]:
            return {"retrained": False, "reason": out["reason"]}
        deployments = [{k: d[k] for k in ("outcome", "counts", "latency")} for d in out["deployments"]]
        return {"registered": out["train"]["registered"], "counts": out["train"]["counts"],
                "redeployed": deployments or "not promoted: devices keep the champion"}  # fmt: skip

    timed("train", t0, phases, lambda: train())
    timed("deploy", t0, phases, deploy)
    needed = sum(p["seconds"] for p in phases)
    time.sleep(max(t0 + 0.5 * total - time.monotonic(), 0))
    if deadline - time.monotonic() < needed:
        left = deadline - time.monotonic()
        phases.append(
            {"phase": "retrain", "skipped": f"{left:.0f} s of the run left, the first round took {needed:.0f} s"}
        )
    else:
        timed("retrain", t0, phases, retrain)
    return phases


def rss_summary(samples: list[tuple[float, float]], warm_from_s: float) -> dict[str, Any]:
    """Start, warm-up, peak and end RSS, the growth after warm-up and its least-squares slope."""
    if not samples:
        return {}
    warm = [(t, m) for t, m in samples if t >= warm_from_s] or samples[-2:]
    t, m = np.asarray([s[0] for s in warm]), np.asarray([s[1] for s in warm])
    slope = float(np.polyfit(t / 60, m, 1)[0]) if len(warm) >= 3 else float("nan")
    return {"start_mb": round(samples[0][1], 1), "warm_mb": round(warm[0][1], 1),
            "peak_mb": round(max(s[1] for s in samples), 1), "end_mb": round(samples[-1][1], 1),
            "growth_after_warmup_mb": round(warm[-1][1] - warm[0][1], 1),
            "slope_mb_per_min": round(slope, 2)}  # fmt: skip


def lake_accounting(observed: dict[str, set[int]]) -> dict[str, Any]:
    """Published windows (from the devices' consecutive sequence numbers) against the lake."""
    from tasks.lake import lake_summary, read_keys

    settings = get_settings()
    summary = lake_summary(settings.lake_root).to_pydict()
    rows = sum(n for d, n in zip(summary["device"], summary["windows"], strict=True) if d.startswith(DEVICE_PREFIX))
    keys = read_keys(settings.lake_root, settings.fleet)
    in_lake: dict[str, set[int]] = {}
    for device, seq in zip(keys["device"].to_pylist(), keys["seq"].to_pylist(), strict=True):
        if device.startswith(DEVICE_PREFIX):
            in_lake.setdefault(device, set()).add(seq)
    devices = set(in_lake) | set(observed)
    # a device numbers its windows 0, 1, 2, ...: the highest seen anywhere bounds what it published
    published = sum(max(in_lake.get(d, set()) | observed.get(d, set())) + 1 for d in devices)
    unique = sum(map(len, in_lake.values()))  # the soak devices' distinct windows (not the reference set's)
    return {"devices_seen": len(devices), "published": published, "observer_saw": sum(map(len, observed.values())),
            "in_lake": unique, "lake_rows": rows, "duplicates": rows - unique,
            "dropped": published - unique}  # fmt: skip


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak and return the report."""
    from tasks.datasets import write_reference_set
    from tasks.deploy import KeyStore
    from tasks.ingest import ensure_subscription, ingest_config
    from tinymlops.contracts.topics import FleetTopics
    from tinymlops.mqtt import MosquittoBroker

    work = Path(args.out or tempfile.mkdtemp(prefix="tinymlops-soak-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker().start()
    os.environ.update({
        "TINYMLOPS_DATA_DIR": str(work / "data"), "TINYMLOPS_KEYS_DIR": str(work / "keys"),
        "TINYMLOPS_MQTT__URL": broker.address.url, "TINYMLOPS_FLEET": args.fleet,
        "TINYMLOPS_TARGETS__DEFAULT": json.dumps([args.target]),
        "TINYMLOPS_DRIFT__WINDOW_MINUTES": str(args.monitor_window / 60), "TINYMLOPS_DRIFT__COOLDOWN_MINUTES": "0",
        "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    })  # fmt: skip
    reset_settings()
    settings = get_settings()
    log.info("soak: %d devices, %.1f min, work directory %s, broker %s", args.devices, args.minutes, work,
             broker.address.url)  # fmt: skip
    KeyStore(settings.resolved_keys_dir).init()
    write_reference_set(settings.lake_root, settings.fleet)  # labelled faults the trainings evaluate on
    ensure_subscription(broker.address, ingest_config(settings, settings.fleet))
    windows = FleetTopics(settings.fleet, settings.mqtt.topic_root).all_devices("vibration")
    observer = WindowObserver(broker.address, windows)
    children: dict[str, Child] = {}
    for role in ROLES:
        result = work / f"{role}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--result", str(result),
                   *sys.argv[1:]]  # fmt: skip
        with (work / f"{role}.log").open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        children[role] = Child(role, process, result)

    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(children, t0, args.sample_every, stop), daemon=True)
    sampler.start()
    phases = lifecycle(args, broker.address.url, t0, deadline)
    while time.monotonic() < deadline and all(c.process.poll() is None for c in children.values()):
        time.sleep(1.0)
    stop.set()
    sampler.join()
    exited = {r: c.process.returncode for r, c in children.items() if c.process.poll() is not None}
    if exited:
        log.error("roles exited early: %s (see their logs in %s)", exited, work)
    devices = children["devices"].stop()
    drained = settle_lake()
    ingest = children["ingest"].stop()
    monitor = children["monitor"].stop()
    observed = observer.stop()
    broker.stop()
    # warm: every device scores and the monitor has run twice with a champion (imports, caches, interpreters)
    deployed = [p["at_s"] + p["seconds"] for p in phases if p["phase"] == "deploy" and "seconds" in p]
    warm = (deployed[0] if deployed else 0.25 * args.minutes * 60) + 2 * args.monitor_every
    report: dict[str, Any] = {
        "minutes": args.minutes, "devices": args.devices, "interval_s": args.interval, "work_dir": str(work),
        "warm_from_s": round(warm, 1), "memory": {r: rss_summary(c.samples, warm) for r, c in children.items()},
        "windows": lake_accounting(observed), "ingest_lag_at_end_s": drained, "ingest": ingest, "fleet": devices,
        "monitor_runs": monitor, "phases": phases,
    }  # fmt: skip
    with (work / "rss.csv").open("w") as csv:
        csv.write("role,t_s,rss_mb\n")
        csv.writelines(f"{r},{t:.1f},{m:.1f}\n" for r, c in children.items() for t, m in c.samples)
    write_json(work / "soak_report.json", report)
    return report


def sample_memory(children: dict[str, Child], t0: float, every_s: float, stop: threading.Event) -> None:
    """Sample each role's resident memory until stopped."""
    while True:
        now = time.monotonic() - t0
        for child in children.values():
            rss = rss_mb(child.process.pid)
            if rss is not None:
                child.samples.append((now, rss))
        if stop.wait(every_s):
            return


def settle_lake(quiet_s: float = 5.0, timeout_s: float = 600.0) -> float:
    """Wait until the ingest stops writing files (it drained what the broker held); returns the seconds waited."""
    root = get_settings().lake_root
    started = time.monotonic()
    last, since = -1, started
    while time.monotonic() - started < timeout_s:
        files = sum(len(names) for _, _, names in os.walk(root))
        if files != last:
            last, since = files, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(1.0)
    return round(time.monotonic() - started - quiet_s, 1)


def log_report(report: dict[str, Any]) -> None:
    """The figures that matter, as a short table."""
    log.info("memory (warm from %.0f s into the run):", report["warm_from_s"])
    log.info("| process | start MB | after warm-up MB | peak MB | end MB | growth after warm-up MB | MB/min |")
    log.info("|---|---|---|---|---|---|---|")
    for role, m in report["memory"].items():
        if m:
            log.info("| %s | %s | %s | %s | %s | %s | %s |", role, m["start_mb"], m["warm_mb"], m["peak_mb"],
                     m["end_mb"], m["growth_after_warmup_mb"], m["slope_mb_per_min"])  # fmt: skip
    w = report["windows"]
    log.info("windows: published %s, in the lake %s, duplicates %s, dropped %s (observer saw %s); the ingest "
             "drained its backlog %s s after the devices stopped", w["published"], w["in_lake"], w["duplicates"],
             w["dropped"], w["observer_saw"], report["ingest_lag_at_end_s"])  # fmt: skip
    for phase in report["phases"]:
        brief = {k: phase[k] for k in ("at_s", "seconds", "outcome", "redeployed", "skipped", "error") if k in phase}
        promoted = [f"v{r['version']} promoted={r['promoted']}" for r in phase.get("registered") or []]
        log.info("phase %s: %s %s", phase["phase"], brief, " ".join(promoted))
    runs = [r for r in report["monitor_runs"] or [] if "model" in r]
    log.info("monitor: %d runs with a champion, verdicts %s, %s s per run at most", len(runs),
             dict(Counter(r["verdict"] for r in runs)), max((r["seconds"] for r in runs), default="-"))  # fmt: skip
    ingest = report["ingest"] or {}
    log.info("ingest: %s windows accepted in %s batches, %s files written", ingest.get("accepted"),
             ingest.get("batches"), ingest.get("files_written"))  # fmt: skip
    log.info("report: %s/soak_report.json", report["work_dir"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (the roles get the orchestrator's options plus ``--role`` and ``--result``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    parser.add_argument("--devices", type=int, default=500, help="simulated devices (default 500)")
    parser.add_argument("--per-connection", type=int, default=50, help="devices per MQTT connection (default 50)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between windows per device (default 1)")
    parser.add_argument("--monitor-every", type=float, default=30.0, help="seconds between monitor runs")
    parser.add_argument("--monitor-window", type=float, default=60.0, help="seconds of data each monitor run judges")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--target", default="nrf52840", help="MCU profile of the devices")
    parser.add_argument("--fleet", default="soak", help="fleet name")
    parser.add_argument("--out", help="work directory (default: a new temporary one)")
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    """Orchestrate a soak run, or play one role in it."""
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    if args.role is None:
        log_report(orchestrate(args))
        return
    {"devices": run_devices, "ingest": run_ingest_role, "monitor": run_monitor_role}[args.role](args)


if __name__ == "__main__":
    main()
