"""The ``tinymlops`` command line: one subcommand per flow, plus the demo and the benchmarks.

The CLI is the top layer: it may import flows (lazily, inside commands, after the process is
configured) while nothing below imports it. Errors of the domain print as one line on stderr
with a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import pydantic
import typer
from rich.table import Table

from tinymlops.cli_deploy import deploy_command, keys_app, ota_app, require_broker, require_prefect_api
from tinymlops.cli_device import PublishBrokerOption, device_app
from tinymlops.cli_firmware import firmware_app
from tinymlops.cli_models import models_app
from tinymlops.cli_security import security_app
from tinymlops.errors import ConfigError, LakeError, TinyMLOpsError
from tinymlops.runtime import configure_logging, configure_prefect_env
from tinymlops.settings import Settings, get_settings, reset_settings, settings_reference_markdown
from tinymlops.terminal import make_console

app = typer.Typer(
    name="tinymlops",
    help="Tiny-MLOps for far-edge vibration sensors: ingest, train, compress, validate, register, redeploy, monitor.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
lake_app = typer.Typer(help="Inspect the Parquet data lake and its quarantine.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks: measured figures and ratios against a baseline in the same run. Without a subcommand: all.",
    invoke_without_command=True,
)
app.add_typer(lake_app, name="lake")
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")
app.add_typer(security_app, name="security")
app.add_typer(device_app, name="device")
app.add_typer(firmware_app, name="firmware")
app.add_typer(keys_app, name="keys")
app.add_typer(ota_app, name="ota")
app.command("deploy")(deploy_command)

console = make_console()
err_console = make_console(stderr=True)
_state = {"debug": False}
log = logging.getLogger(__name__)

# Signals that stop a command: Ctrl-C, ``kill`` (systemd, Docker, CI) and a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class _Stopping:
    """The stop signal this process received, once one arrived (then it only cleans up and exits)."""

    signal: signal.Signals | None = None


_stopping = _Stopping()


def _on_stop_signal(signum: int, _frame: FrameType | None) -> None:
    """Turn the first stop signal into KeyboardInterrupt in the main thread; later ones only wait for the cleanup.

    Python's default SIGTERM and SIGHUP end the process at once, skipping ``finally``, ``with`` exits
    and atexit: Mosquitto, Prefect's temporary server and QEMU (in a session of its own) were left
    running. Raised as KeyboardInterrupt, every stop goes through the cleanups Ctrl-C runs. A signal
    arriving during those is not raised again: interrupting a cleanup halfway is what leaves orphans
    (SIGKILL still forces an exit).
    """
    if _stopping.signal is not None:
        log.warning("stopping already (%s); waiting for the started services to stop", _stopping.signal.name)
        return
    _stopping.signal = signal.Signals(signum)
    raise KeyboardInterrupt


def _settings() -> Settings:
    settings = get_settings()
    configure_prefect_env(settings)
    return settings


def _check_fleet(fleet: str | None) -> None:
    """Refuse a fleet name that cannot be one topic level or lake partition (``a/b`` would escape it)."""
    if fleet is not None:
        from tinymlops.contracts.topics import check_name

        check_name(fleet, "fleet")


def _writable_dir(path: Path, what: str) -> None:
    """Fail fast when a directory a command writes to cannot exist (a file, or a path under a file)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot use {path} as the {what}: {exc.strerror or exc}") from None


def _readable_dir(path: Path, what: str) -> None:
    """Refuse a directory to read that is a file; a missing one is empty (nothing written yet)."""
    if path.exists() and not path.is_dir():
        raise LakeError(f"the {what} {path} is not a directory: fix TINYMLOPS_DATA_DIR or the lake settings")


class _NoTracebackFormatter(logging.Formatter):
    """Formats like ``inner`` but with an exception as one ``(Type: message)`` suffix instead of a traceback."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        exc = record.exc_info[1] if record.exc_info else None
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = self._inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        if exc is None or _one_line(str(exc)) in text:  # Prefect's records already name the exception
            return text
        return f"{text} ({type(exc).__name__}: {_one_line(str(exc))})"


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] + (" [...]" if len(lines) > 1 else "") if lines else ""


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors in the log.")] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Data directory (lake, stores), as TINYMLOPS_DATA_DIR; the demo's: data/demo."),
    ] = None,
) -> None:
    """Tiny-MLOps for far-edge vibration sensors. Settings come from TINYMLOPS_* environment variables."""
    if data_dir is not None:  # before any setting is read; child processes (serve, services) inherit it
        os.environ["TINYMLOPS_DATA_DIR"] = str(data_dir.resolve())
        reset_settings()
    _state["debug"] = debug
    configure_logging(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    if not debug:  # a failing flow logs its traceback (Prefect): the one-line error is enough without --debug
        for handler in logging.getLogger().handlers:
            if not isinstance(handler.formatter, _NoTracebackFormatter):
                handler.setFormatter(_NoTracebackFormatter(handler.formatter or logging.Formatter()))


@app.command()
def demo(
    devices: Annotated[int, typer.Option(min=2, max=500, help="Simulated devices per MCU profile.")] = 10,
    quick: Annotated[bool, typer.Option(help="Short phases and training (CI).")] = False,
    keep_running: Annotated[bool, typer.Option(help="Leave the services up at the end for exploring the UIs.")] = False,
    real_data: Annotated[
        bool, typer.Option(help="Devices replay the real CWRU recordings instead of the physics simulator.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on the last line.")] = False,
) -> None:
    """Run the whole Tiny-MLOps loop on embedded defaults: fleet, train, deploy, fault alert, drift, retraining."""
    settings = _settings()
    require_broker(settings.mqtt.url, "TINYMLOPS_MQTT__URL")
    if real_data:  # before any service starts
        from tasks.importers import CWRU_GLOB

        if not any(settings.cwru_dir.glob(CWRU_GLOB)):
            raise ConfigError(f"no CWRU recordings ({CWRU_GLOB}) in {settings.cwru_dir}: set TINYMLOPS_CWRU_DIR")
    from tinymlops.demo import DemoConfig, run_demo

    config = DemoConfig(
        devices_per_profile=devices,
        quick=quick,
        keep_running=keep_running,
        real_data=real_data,
        ingest_s=20.0 if quick else 40.0,
        monitor_s=15.0 if quick else 25.0,
    )
    run_demo(config, console, report=lambda summary: _print_demo_summary(summary, as_json))


def _print_demo_summary(summary: Any, as_json: bool) -> None:
    console.rule("[bold]Summary")
    _print_table("Models per MCU profile (champion)", summary.models)
    _print_table("Devices: what they run and the Tiny-MLOps latencies", summary.devices)
    _print_table("Fault alerts", summary.alerts)
    _print_table("Drift", summary.drift)
    _print_table("Event-triggered retrainings", summary.retrainings)
    for name, url in summary.urls.items():
        console.print(f"{name}: {url}")
    console.print(
        f"Prefect UI: flow runs 'full-loop', 'monitor', 'retrain-and-redeploy' and their artifacts; "
        f"MLflow UI: experiments tinymlops, tinymlops-monitoring, tinymlops-deployments; "
        f"models vibration-ae-*. Data: {summary.data_dir}. Took {summary.seconds:.0f} s."
    )
    if as_json:
        print(json.dumps(summary.to_dict(), default=str))


@app.command()
def ingest(
    fleet: Annotated[str | None, typer.Option(help="Fleet to ingest (default from settings).")] = None,
    seconds: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    max_windows: Annotated[int | None, typer.Option(min=1, help="Stop after this many accepted windows.")] = None,
    idle_timeout: Annotated[float | None, typer.Option(help="Stop after this many silent seconds.")] = None,
    broker: Annotated[str | None, typer.Option(help="Broker URL (default: settings, else embedded).")] = None,
) -> None:
    """Ingest vibration windows from MQTT into the lake (the ingest flow); runs until a bound or Ctrl-C."""
    settings = _settings()
    # fail before any flow machinery starts
    _check_fleet(fleet)
    _writable_dir(settings.lake_root, "lake")
    _writable_dir(settings.quarantine_root, "quarantine")
    from tasks.lake import ingest_lease

    with ingest_lease(settings.lake_root, fleet or settings.fleet, settings.mqtt.client_id):
        pass  # a running ingest of the fleet: refuse now; the flow takes the lease for its whole run
    require_broker(broker or settings.mqtt.url, "--broker" if broker else "TINYMLOPS_MQTT__URL")
    require_prefect_api(settings)
    from flows.ingest import ingest_flow

    stats = ingest_flow(
        fleet=fleet, seconds=seconds, max_windows=max_windows, idle_timeout_s=idle_timeout, broker_url=broker
    )
    console.print_json(json.dumps(stats))


@app.command()
def simulate(
    devices: Annotated[int, typer.Option(min=1, max=5000, help="Number of sensor nodes.")] = 10,
    fleet: Annotated[str | None, typer.Option(help="Fleet name (default from settings).")] = None,
    seconds: Annotated[float | None, typer.Option(help="Stream for this long.")] = None,
    windows: Annotated[int | None, typer.Option(min=1, help="Windows per node, then stop.")] = None,
    interval: Annotated[float, typer.Option(min=0.0, help="Seconds between two windows of one node.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Base seed of the machines.")] = 0,
    fault: Annotated[
        list[str] | None, typer.Option(help="Inject KIND:SEVERITY[:DEVICE,...], e.g. inner_race:0.8:node-0001.")
    ] = None,
    rpm: Annotated[
        float, typer.Option(min=60.0, max=60_000.0, help="Nominal shaft speed; each machine runs within +/-2 % of it.")
    ] = 1797.0,
    broker: PublishBrokerOption = None,
) -> None:
    """Run a virtual fleet of sensor nodes that publish vibration windows (with their speed) over MQTT."""
    settings = _settings()
    _check_fleet(fleet)
    if seconds is None and windows is None:
        raise typer.BadParameter("give --seconds or --windows", param_hint="--seconds")
    from firmware.boot import next_boot_epoch
    from firmware.fleet import VirtualFleet
    from firmware.sensor import FaultSpec
    from tinymlops.mqtt import broker_to_publish_to

    name = fleet or settings.fleet
    # Every run is a new boot of the nodes: seqs restart at 0 in a new epoch, kept in a counter file.
    boot_epoch = next_boot_epoch(settings.data_dir / "simulate" / f"{name}.boot-epoch", sender=f"fleet {name}")
    sim = VirtualFleet(
        name,
        devices,
        seed=seed,
        sample_rate_hz=settings.sensor.sample_rate_hz,
        window_samples=settings.sensor.window_samples,
        topic_root=settings.mqtt.topic_root,
        boot_epoch=boot_epoch,
        rpm=rpm,
    )
    for spec in fault or []:
        kind, _, rest = spec.partition(":")
        severity, _, targets = rest.partition(":")
        try:
            fault_spec = FaultSpec(kind=kind, severity=float(severity or 1.0))  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            raise typer.BadParameter(f"invalid fault {spec!r}: {exc}", param_hint="--fault") from None
        sim.inject_fault(fault_spec, targets.split(",") if targets else None)
    mqtt_settings = settings.mqtt.model_copy(update={"url": broker or settings.mqtt.url})
    with broker_to_publish_to(mqtt_settings, settings.data_dir) as address:
        stats = sim.run(address, interval_s=interval, duration_s=seconds, windows_per_device=windows)
    console.print(
        f"published {stats.published} windows from {devices} nodes in {stats.seconds:.1f} s (boot epoch {boot_epoch})"
    )


@app.command()
def train(
    fleet: Annotated[str | None, typer.Option(help="Fleet whose lake windows to train on.")] = None,
    target: Annotated[list[str] | None, typer.Option(help="MCU target from the catalog (repeatable).")] = None,
    device: Annotated[list[str] | None, typer.Option(help="Only these devices' windows (repeatable).")] = None,
    since: Annotated[str | None, typer.Option(help="Only windows from this ISO time (UTC if no zone).")] = None,
    until: Annotated[str | None, typer.Option(help="Only windows before this ISO time.")] = None,
    config: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Training configuration YAML.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
) -> None:
    """Train, compress and validate the anomaly model per MCU target (the train flow)."""
    settings = _settings()
    start, end = _parse_time(since, "--since"), _parse_time(until, "--until")
    # Fail before the flow (and minutes of training) starts: targets, fleet data, services.
    from registry.store import check_tracking
    from tasks.lake import lake_summary
    from tinymlops.targets import get_target, load_catalog

    catalog = load_catalog(settings.targets.catalog)
    for name in target or settings.targets.default:
        get_target(name, catalog)
    _check_fleet(fleet)
    name = fleet or settings.fleet
    fleets = sorted(set(lake_summary(settings.lake_root).column("fleet").to_pylist()))
    if name not in fleets:
        known = ", ".join(fleets) or "none"
        raise LakeError(
            f"no windows of fleet {name!r} in the lake at {settings.lake_root} (fleets: {known}); "
            "ingest or import some first"
        )
    check_tracking(settings.mlflow_tracking_uri)
    require_prefect_api(settings)
    from flows.train import train_flow

    outcome = train_flow(
        fleet=fleet,
        targets=target,
        devices=device,
        start=start,
        end=end,
        config_path=str(config) if config else None,
    )
    if as_json:
        print(json.dumps(outcome))
        return
    _print_table("Quality on held-out windows", [{"model": k, **v} for k, v in outcome["evaluation"].items()])
    _print_table("Sizes", outcome["sizes"])
    _print_table(
        "Bundles",
        [{"target": t, "fits": outcome["budget_passed"][t], "bundle": d} for t, d in outcome["bundles"].items()],
    )


@app.command()
def evaluate(
    model: Annotated[
        str, typer.Option(help="Model bundle directory, or registry reference NAME@alias / NAME/version.")
    ],
    data: Annotated[
        str, typer.Option(help="Lake selector fleet=NAME[,device=A|B][,since=ISO][,until=ISO], or a lake directory.")
    ],
    output: Annotated[Path | None, typer.Option(help="Also write the evaluation JSON to this file.")] = None,
    holdout: Annotated[
        bool, typer.Option(help="Only normal windows the model did not train on (outside each device's trained span).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the evaluation as JSON instead of a table.")] = False,
) -> None:
    """Evaluate a model (float, int8 TFLite, int8 TFLite Micro) on labelled lake windows at its threshold."""
    settings = _settings()
    from tasks.datasets import LakeSelection, load_labelled, outside_spans, parse_selector
    from tasks.evaluate import evaluate_bundle
    from tasks.train import WindowSpeeds

    bundle = _load_model(model)
    lake_root, selection = settings.lake_root, None
    if Path(data).is_dir():
        lake_root, selection = Path(data), LakeSelection(bundle.metadata.fleet)
    else:
        selection = parse_selector(data)
    labelled = load_labelled(
        lake_root, selection, window_samples=settings.sensor.window_samples, max_abs_g=settings.sensor.max_abs_g
    )
    normal = labelled.normal
    if holdout:
        spans = bundle.metadata.trained_span_us
        if not spans:
            raise ConfigError(f"{model} records no trained windows (a bundle from before the record): no --holdout")
        normal = normal.select(outside_spans(normal, spans))
        if not len(normal):
            raise ConfigError(f"no normal windows of {data} lie outside what {model} trained on")
    comparison = evaluate_bundle(
        bundle,
        normal.samples,
        labelled.faults,
        window_seconds=settings.sensor.window_samples / labelled.normal.sample_rate_hz,
        speeds=WindowSpeeds(test=normal.rpm, faults=labelled.fault_rpm),
    )
    report = {
        "model": model,
        "data": data,
        "holdout": holdout,
        "threshold": bundle.metadata.threshold,
        "evaluations": comparison.to_dict(),
    }
    if output is not None:
        output.write_text(json.dumps(report, indent=2))
    if as_json:
        print(json.dumps(report))
        return
    scope = "held-out windows of " if holdout else ""
    title = f"{bundle.metadata.model_name} on {scope}{data} (threshold {bundle.metadata.threshold:.4g})"
    evaluations = comparison.evaluations
    _print_table(
        title,
        [
            {
                "model": name,
                "auc": e.auc,
                "precision": e.precision,
                "recall": e.recall,
                "f1": e.f1,
                "false alarms/h": e.false_alarms_per_hour,
                "false alarm rate": e.false_alarm_rate,
                f"upper bound ({e.confidence:.0%})": e.false_alarm_upper,
                "normal windows": e.n_normal,
            }
            for name, e in evaluations.items()
        ],
    )
    _print_table("ROC-AUC per fault class", [{"model": name, **e.auc_by_fault} for name, e in evaluations.items()])
    _print_table("Detected per fault class", [{"model": name, **e.recall_by_fault} for name, e in evaluations.items()])


def _load_model(ref: str) -> Any:
    """A verified bundle from a directory, or from the registry for NAME, NAME@alias, NAME/version, models:/..."""
    from tinymlops.schemas import load_bundle

    if Path(ref).is_dir():
        return load_bundle(Path(ref))
    if ref.startswith(("/", ".", "~")):  # meant as a path: a registry name never starts so
        raise ConfigError(f"no model bundle directory {ref}: give an existing directory or NAME@ALIAS")
    from registry.models import resolve
    from registry.store import configure_from_settings

    configure_from_settings(get_settings())
    return resolve(ref).bundle


@app.command()
def monitor(
    fleet: Annotated[str | None, typer.Option(help="Fleet to judge (default from settings).")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Judge every device with this model, NAME@alias (default: its MCU profile's champion)."),
    ] = None,
    minutes: Annotated[
        float | None, typer.Option(min=0.05, help="How far back to look (default: drift.window_minutes).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="End of the window, ISO time (default: now).")] = None,
    events: Annotated[bool, typer.Option(help="Emit the drift and alert events (retraining may follow).")] = True,
    summary_seconds: Annotated[
        float, typer.Option(min=0, help="Collect the devices' drift summaries for at most this long first (0: none).")
    ] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON.")] = False,
) -> None:
    """Judge a fleet's last minutes of live windows and drift summaries: ok, fault (alert) or data drift."""
    settings = _settings()
    end = _parse_time(until, "--until")
    _check_fleet(fleet)
    from registry.store import check_tracking

    check_tracking(settings.mlflow_tracking_uri)
    require_prefect_api(settings)
    from flows.monitor import monitor_flow

    report = monitor_flow(
        fleet=fleet,
        model_ref=model,
        window_minutes=minutes,
        until=end,
        emit_events=events,
        summary_seconds=summary_seconds,
    )
    if as_json:
        print(json.dumps(report))
        return
    console.print(f"fleet {report['fleet']}: [bold]{report['verdict']}[/]; summary collection: {report['summaries']}")
    for part in report["reports"]:  # one per champion: each device is judged by its MCU profile's
        assessment = part["assessment"]
        counts = f"{part['windows_live']} live windows, {part['summaries_used']} summaries"
        model_line = f"model {part['model']}, threshold {part['threshold']:.4g}"
        console.print(f"{part['profile']}: [bold]{part['verdict']}[/] ({counts}, {model_line})")
        for reason in assessment["reasons"]:
            console.print(f"  {reason}")
        _print_table(
            f"Devices judged by {part['model']}",
            [
                {
                    "device": d["device"],
                    "verdict": d["verdict"] + (f" ({d['drift_kind']})" if d["drift_kind"] else ""),
                    "source": d["source"],
                    "windows": d["n_windows"],
                    "anomaly rate": d["anomaly_rate"],
                    "limit": d["anomaly_rate_limit"],
                    "no usable speed": d["speed_fallback"],
                    "uncovered speed": d["speed_uncovered"],
                    "why this model": report["judged_by"][d["device"]]["reason"],
                }
                for d in assessment["devices"]
            ],
        )
    console.print(f"events: {', '.join(report['events']) or 'none'}")


@app.command()
def reference(
    fleet: Annotated[str | None, typer.Option(help="Fleet to add the reference set to.")] = None,
    windows: Annotated[int, typer.Option(min=8, help="Windows per fault class.")] = 64,
    rpm: Annotated[float, typer.Option(min=60, help="Shaft speed of the fleet's machines.")] = 1797.0,
) -> None:
    """Add a labelled seeded-fault reference set (simulated) to a fleet, for evaluating its models."""
    settings = _settings()
    _check_fleet(fleet)
    _writable_dir(settings.lake_root, "lake")
    from tasks.datasets import write_reference_set

    written = write_reference_set(
        settings.lake_root,
        fleet or settings.fleet,
        windows_per_fault=windows,
        rpm=rpm,
        sample_rate_hz=settings.sensor.sample_rate_hz,
        window_samples=settings.sensor.window_samples,
    )
    console.print(f"reference set: {written} windows written" if written else "reference set already present")


def _parse_time(value: str | None, option: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO time such as 2026-11-23T08:00", param_hint=option) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


RpmOption = Annotated[
    float | None,
    typer.Option(
        help="Shaft speed of the machine in rpm, (0, 60000] (default: the file's rpm field or column, if any)."
    ),
]


@app.command("import")
def import_files(
    paths: Annotated[list[Path], typer.Argument(help="Files: .npz, .mat, .csv or .parquet.")],
    fs: Annotated[float | None, typer.Option(help="Sampling rate of the files in Hz (if the file has none).")] = None,
    device: Annotated[str | None, typer.Option(help="Device id (default: file name).")] = None,
    label: Annotated[str | None, typer.Option(help="Label: normal, or a fault type such as inner_race.")] = None,
    var: Annotated[str | None, typer.Option(help="Variable/column to read when a file has several.")] = None,
    fleet: Annotated[str | None, typer.Option(help="Fleet (default from settings).")] = None,
    start: Annotated[
        str | None, typer.Option(help="ISO time of the first file's first sample (UTC if no zone; default now).")
    ] = None,
    rpm: RpmOption = None,
    load: Annotated[
        float | None, typer.Option(help="Load of the machine, fraction of rated 0..1 (default: the file's, if any).")
    ] = None,
) -> None:
    """Import recorded vibration files into the lake, resampled to the fleet's sensor rate.

    The files of one call are one recording in the order given: each starts where the one before ended. The
    machine's shaft speed and load are stored with every window: --rpm/--load, else the file's own (an rpm
    field or column), else not known.
    """
    settings = _settings()
    next_start = _parse_time(start, "--start")
    _check_fleet(fleet)
    _writable_dir(settings.lake_root, "lake")
    from tasks.importers import ImportLimits, import_file

    limits = ImportLimits(settings.lake.import_max_samples, settings.lake.import_max_mat_mb * 2**20)
    rows = []
    for path in paths:
        result = import_file(
            path,
            lake_root=settings.lake_root,
            fleet=fleet or settings.fleet,
            device=device,
            label=label,
            var=var,
            fs=fs,
            target_rate_hz=settings.sensor.sample_rate_hz,
            window_samples=settings.sensor.window_samples,
            max_abs_g=settings.sensor.max_abs_g,
            limits=limits,
            start=next_start,
            rpm=rpm,
            load=load,
        )
        next_start = result.end or next_start
        rows.append(
            {
                "file": str(path),
                "device": result.device,
                "label": result.label or "",
                "windows": result.windows,
                "note": "already imported" if result.duplicate else "",
            }
        )
    _print_table("Imported", rows)


@app.command()
def replay(
    path: Annotated[Path, typer.Argument(help="Recording: .npz, .mat, .csv or .parquet.")],
    device: Annotated[str, typer.Option(help="Device id the windows are published as.")],
    fs: Annotated[float | None, typer.Option(help="Sampling rate in Hz (if the file has none).")] = None,
    var: Annotated[str | None, typer.Option(help="Variable/column to read when the file has several.")] = None,
    speed: Annotated[float, typer.Option(min=0.0, help="Playback speed, x real time; 0: as fast as possible.")] = 1.0,
    fleet: Annotated[str | None, typer.Option(help="Fleet (default from settings).")] = None,
    broker: PublishBrokerOption = None,
    rpm: RpmOption = None,
) -> None:
    """Publish a recording over MQTT as a live sensor would, for the ingest and the monitor to judge it.

    Each window carries the machine's shaft speed as its tachometer value: --rpm, else the file's own (an rpm
    field or column), else none.
    """
    settings = _settings()
    _check_fleet(fleet)
    from firmware.boot import next_boot_epoch
    from firmware.replay import replay as replay_recording
    from tasks.importers import ImportLimits, load_recording_with_rpm
    from tinymlops.contracts.topics import FleetTopics
    from tinymlops.mqtt import broker_to_publish_to

    name = fleet or settings.fleet
    topic = FleetTopics(name, settings.mqtt.topic_root).vibration(device)  # checks the device id
    limits = ImportLimits(settings.lake.import_max_samples, settings.lake.import_max_mat_mb * 2**20)
    signal, rpms = load_recording_with_rpm(
        path, target_rate_hz=settings.sensor.sample_rate_hz, window_samples=settings.sensor.window_samples, rpm=rpm,
        var=var, fs=fs, limits=limits,
    )  # fmt: skip
    mqtt_settings = settings.mqtt.model_copy(update={"url": broker or settings.mqtt.url})
    with broker_to_publish_to(mqtt_settings, settings.data_dir) as address:
        stats = replay_recording(
            signal,
            address,
            topic=topic,
            device_id=device,
            sample_rate_hz=settings.sensor.sample_rate_hz,
            window_samples=settings.sensor.window_samples,
            speed=speed,
            # Every replay is a new boot of the sensor: its seqs restart at 0 in a new epoch.
            boot_epoch=next_boot_epoch(settings.data_dir / "simulate" / f"{name}.boot-epoch", sender=device),
            rpm=rpms,
        )
    console.print(
        f"replayed {stats.windows} windows of {path} as {name}/{device} to {address.url} in {stats.seconds:.1f} s "
        f"(full scale {stats.full_scale_g:.3g} g)"
    )


@app.command("import-cwru")
def import_cwru_command(
    directory: Annotated[Path | None, typer.Argument(help="CWRU directory (default: settings.cwru_dir).")] = None,
    fleet: Annotated[str, typer.Option(help="Fleet to import into.")] = "cwru",
) -> None:
    """Import the real CWRU bearing recordings (normal and faults, labelled) into the lake."""
    settings = _settings()
    _check_fleet(fleet)
    _writable_dir(settings.lake_root, "lake")
    from tasks.importers import ImportLimits, import_cwru

    results = import_cwru(
        directory or settings.cwru_dir,
        lake_root=settings.lake_root,
        fleet=fleet,
        target_rate_hz=settings.sensor.sample_rate_hz,
        window_samples=settings.sensor.window_samples,
        max_abs_g=settings.sensor.max_abs_g,
        limits=ImportLimits(settings.lake.import_max_samples, settings.lake.import_max_mat_mb * 2**20),
    )
    _print_table(
        "Imported",
        [
            {
                "device": r.device,
                "label": r.label or "",
                "windows": r.windows,
                "note": "already imported" if r.duplicate else "",
            }
            for r in results
        ],
    )


@lake_app.command("summary")
def lake_summary_command() -> None:
    """Count windows per fleet, device and label."""
    settings = _settings()
    _readable_dir(settings.lake_root, "lake")
    from tasks.lake import lake_summary

    _print_table("Lake contents", lake_summary(settings.lake_root).to_pylist())


@lake_app.command("compact")
def lake_compact_command(
    fleet: Annotated[str | None, typer.Option(help="Only this fleet (default: every fleet).")] = None,
    after_minutes: Annotated[
        int | None, typer.Option(min=0, help="Compact hours that ended this long ago (default: settings).")
    ] = None,
) -> None:
    """Merge each closed hour partition's files into one (the ingest flow does this after every run)."""
    settings = _settings()
    _check_fleet(fleet)
    _readable_dir(settings.lake_root, "lake")
    from tasks.lake import compact_lake

    minutes = settings.lake.compact_after_minutes if after_minutes is None else after_minutes
    closed_before = dt.datetime.now(tz=dt.UTC) - dt.timedelta(minutes=minutes)
    report = compact_lake(settings.lake_root, fleet=fleet, closed_before=closed_before)
    console.print_json(json.dumps(report.to_dict()))


@lake_app.command("quarantine")
def lake_quarantine_command(limit: Annotated[int, typer.Option(min=1)] = 20) -> None:
    """List the most recent rejected messages and why they were rejected."""
    settings = _settings()
    _readable_dir(settings.quarantine_root, "quarantine")
    from tasks.lake import read_quarantine

    table = read_quarantine(settings.quarantine_root).sort_by([("received_at", "descending")])
    rows = [
        {
            "received_at": str(r["received_at"]),
            "topic": r["topic"],
            "reason": r["reason"],
            "bytes": r["payload_bytes"],
            "sha256": (r["payload_sha256"] or "")[:16],
        }
        for r in table.slice(0, limit).to_pylist()
    ]
    _print_table(f"Quarantine ({table.num_rows} messages)", rows)


@app.command()
def serve(
    only: Annotated[
        list[str] | None, typer.Option(help="Serve only these: ingest, monitor, retrain, train, deploy, full-loop.")
    ] = None,
) -> None:
    """Serve the deployments (schedules, drift-triggered retraining) against a Prefect server until Ctrl-C."""
    settings = _settings()
    if not settings.prefect.api_url and "PREFECT_API_URL" not in os.environ:
        raise typer.BadParameter(
            "serving needs a Prefect server: start one (prefect server start) and set "
            "TINYMLOPS_PREFECT__API_URL=http://127.0.0.1:4200/api",
            param_hint="--only",
        )
    from flows.deployments import NAMES, serve_deployments

    unknown = sorted(set(only or ()) - set(NAMES))
    if unknown:
        raise typer.BadParameter(
            f"unknown deployments {', '.join(unknown)}; choose from {', '.join(NAMES)}", param_hint="--only"
        )
    require_prefect_api(settings)
    with _ota_service(settings):
        serve_deployments(set(only) if only else None)


@contextlib.contextmanager
def _ota_service(settings: Settings) -> Iterator[None]:
    """The fleet's OTA service beside the served deployments, when a broker is configured and none runs yet."""
    from tasks.deploy import KeyStoreError
    from tasks.ota_service import OtaServiceError, start_ota_service

    if not settings.mqtt.url:
        yield
        return
    try:
        service = start_ota_service(settings)
    except (OtaServiceError, KeyStoreError) as exc:  # another one serves the fleet, or nothing is signed yet
        log.warning("not starting the OTA service: %s", exc)
        yield
        return
    try:
        yield
    finally:
        service.stop()


@app.command()
def broker() -> None:
    """Start the embedded MQTT broker (Mosquitto if installed, else amqtt) and keep it up until Ctrl-C.

    It is announced in the data directory, so `simulate` and `device run` started later publish to it.
    """
    settings = _settings()
    from tinymlops.mqtt import announced, broker_for

    with broker_for(settings.mqtt.model_copy(update={"url": None})) as address, announced(address, settings.data_dir):
        console.print(f"MQTT broker listening on [bold]{address.url}[/]; Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


@app.command("config")
def show_config(
    reference: Annotated[bool, typer.Option(help="Print the reference of every setting as markdown.")] = False,
) -> None:
    """Print the effective settings, derived defaults resolved and secrets masked, or the reference of all settings."""
    if reference:
        print(settings_reference_markdown(), end="")
        return
    console.print_json(json.dumps(get_settings().resolved()))


@bench_app.callback()
def bench_all(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option(help="Reduced run for CI.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print all figures as JSON on the last line.")] = False,
    output: Annotated[Path, typer.Option(help="Where to write the figures.")] = Path("bench/results.json"),
    render_readme: Annotated[
        bool, typer.Option(help="Only rewrite README.md's benchmark table from the existing figures file.")
    ] = False,
) -> None:
    """Run the ingest, model, quality, deploy, loop and firmware benchmarks and write one JSON file of all figures."""
    if ctx.invoked_subcommand is not None:
        return
    if render_readme:
        from tinymlops.bench import render_readme_table

        render_readme_table(output, Path("README.md"))
        console.print(f"README.md's benchmark table rendered from {output}")
        return
    settings = _settings()
    # fail before hours of benchmarks: where the figures go, and the broker the loop benchmark uses
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the figures to {output}: {exc.strerror or exc}") from None
    require_broker(settings.mqtt.url, "TINYMLOPS_MQTT__URL")
    from tinymlops.bench import machine_description

    figures: dict[str, Any] = {"quick": quick, **machine_description()}
    for name in ("ingest", "model", "quality", "deploy", "loop", "firmware"):
        console.rule(f"bench {name}")
        # Each benchmark in its own process: Prefect binds its settings and events worker once per process.
        command = [sys.executable, "-m", "tinymlops", "bench", name, "--json", *(["--quick"] if quick else [])]
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise TinyMLOpsError(f"bench {name} failed (exit {result.returncode}); run it alone to see why")
        figures.update(json.loads(result.stdout.strip().splitlines()[-1]))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    _print_table("Benchmarks", [{"figure": k, "value": v} for k, v in sorted(figures.items())])
    console.print(f"written to {output}")
    if as_json:
        print(json.dumps(figures))


@bench_app.command("deploy")
def bench_deploy_command(
    quick: Annotated[bool, typer.Option(help="Reduced run for CI.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """Deployment, loading and inference latency; fleet updates against bare broker delivery."""
    settings = _settings()
    from tinymlops.bench_deploy import bench_deploy

    figures = bench_deploy(settings, quick=quick)
    _print_table("Deploy benchmark", [{"figure": k, "value": v} for k, v in figures.items()])
    if as_json:
        print(json.dumps(figures))


@bench_app.command("quality")
def bench_quality_command(
    quick: Annotated[bool, typer.Option(help="Reduced run for CI.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """False alarms at unseen shaft speeds and detection of the smallest faults: fixed vs speed-aware features."""
    settings = _settings()
    from tinymlops.bench_quality import bench_quality

    figures = bench_quality(settings, quick=quick)
    _print_table("Quality benchmark", [{"figure": k, "value": v} for k, v in figures.items()])
    if as_json:
        print(json.dumps(figures))


@bench_app.command("firmware")
def bench_firmware_command(
    quick: Annotated[bool, typer.Option(help="Reduced run for CI.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """Instructions per window on the emulated M4F and M0, image sizes, OTA through the gateway, vs the estimates."""
    settings = _settings()
    from tinymlops.bench_firmware import bench_firmware

    figures = bench_firmware(settings, quick=quick)
    _print_table("Firmware benchmark", [{"figure": k, "value": v} for k, v in figures.items()])
    if as_json:
        print(json.dumps(figures))


@bench_app.command("loop")
def bench_loop_command(
    quick: Annotated[bool, typer.Option(help="Reduced run for CI.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """Time drift onset -> drift event -> retrained model active on every device of a simulated fleet."""
    settings = _settings()
    require_broker(settings.mqtt.url, "TINYMLOPS_MQTT__URL")
    from tinymlops.bench_loop import bench_loop

    figures = bench_loop(settings, quick=quick)
    _print_table("Loop benchmark", [{"figure": k, "value": v} for k, v in figures.items()])
    if as_json:
        print(json.dumps(figures))


@bench_app.command("ingest")
def bench_ingest(
    quick: Annotated[bool, typer.Option(help="Reduced run for CI.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """Measure ingest throughput into the lake against a bare subscriber draining the same stream."""
    settings = _settings()
    from tinymlops.bench import bench_ingest as run_bench

    figures = run_bench(settings, quick=quick)
    _print_table("Ingest benchmark", [{"figure": k, "value": v} for k, v in figures.items()])
    if as_json:
        print(json.dumps(figures))


@bench_app.command("model")
def bench_model_command(
    quick: Annotated[bool, typer.Option(help="Reduced run for CI.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """Compare our int8 model with the MLPerf Tiny anomaly-detection reference on the real CWRU data."""
    settings = _settings()
    from tinymlops.bench_model import bench_model

    figures = bench_model(settings, quick=quick)
    _print_table("Model benchmark", [{"figure": k, "value": v} for k, v in figures.items()])
    if as_json:
        print(json.dumps(figures))


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    if not rows:
        console.print(f"{title}: (none)")
        return
    for column in rows[0]:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*(f"{v:,.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)


def _validation_line(exc: pydantic.ValidationError) -> str:
    """One line for a pydantic error: the first invalid field (as its environment variable for settings)."""
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"]]
    if exc.title == Settings.__name__:
        fields = [str(part) for part in itertools.takewhile(lambda part: isinstance(part, str), first["loc"])]
        where = "TINYMLOPS_" + "__".join(fields).upper()
        value = "" if "password" in where.lower() else f"={first.get('input')!r}"  # never echo a secret
        return f"invalid setting {where}{value}: {first['msg']}"
    return f"invalid {exc.title} {'.'.join(loc) or 'value'}: {first['msg']}"


def main() -> None:
    """Console-script entry point: run the app; errors and stop signals end it with one line.

    A domain error exits 1, a usage error 2. SIGINT, SIGTERM and SIGHUP stop the command as Ctrl-C
    does, then exit ``128 + signal`` (130, 143, 129) after ``stopped by SIG...``.
    """
    _stopping.signal = None
    # A signal the parent set to ignore stays ignored: ``nohup`` (SIGHUP), a background job (SIGINT).
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, _on_stop_signal)
    try:
        _run_app()
    except SystemExit:
        if _stopping.signal is None:
            raise
    finally:
        if _stopping.signal is None:  # called in-process (tests): leave the caller's handlers as they were
            for sig, handler in previous.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(sig, handler)
    if _stopping.signal is not None:
        # The handler stays: atexit cleanups (Prefect's temporary server) still run after this exit.
        err_console.print(f"stopped by {_stopping.signal.name}", highlight=False)
        sys.exit(128 + _stopping.signal)


def _run_app() -> None:
    """Run the app; turn domain errors into one line and exit 1."""
    try:
        app(standalone_mode=False)
    except typer.Abort:
        if _stopping.signal is None:  # a stop signal has its own line, in main
            err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: bad option values, missing arguments
        exc.show()  # type: ignore[attr-defined]
        sys.exit(getattr(exc, "exit_code", 2))
    except TinyMLOpsError as exc:
        _fail(_one_line(str(exc)))
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        # a path that cannot be used, found deep inside: name the path; a socket failure is unexpected
        if exc.filename is not None:
            _fail(f"cannot use {exc.filename}: {exc.strerror or exc}")
        _fail(_unexpected(exc))
    except pydantic.ValidationError as exc:  # TINYMLOPS_* settings from the environment
        _fail(_validation_line(exc))
    except Exception as exc:  # a bug or an unforeseen failure: still one line, the traceback on request
        _fail(_unexpected(exc))


def _unexpected(exc: Exception) -> str:
    return f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (--debug shows the traceback)"


def _fail(line: str) -> NoReturn:
    """Print ``error: <line>`` on stderr (and the traceback of the exception being handled with --debug); exit 1."""
    err_console.print(f"error: {line}", highlight=False, markup=False, soft_wrap=True)
    if _state["debug"]:
        traceback.print_exc()
    sys.exit(1)
