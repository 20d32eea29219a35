"""The drift monitor end to end on a real Parquet lake, with the simulated fleet's real bundle in TFLite Micro.

The lake holds, for one fleet: 40 live windows per device in a first 10-minute window (one
machine with an inner-race fault), labelled imported windows in the same window (must be left
out), and 40 live windows per device in a later window after a +30% sensor gain change on every
device. Measured: the first window is ``fault`` (node-0003, anomaly rate 100%, the others ok),
the second ``data_drift`` (10/10 devices drifted).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prefect.events import Event

from firmware.ota import Announcement, DriftSummary
from firmware.sensor import DriftSpec, FaultSpec
from tasks.lake import WindowBatch, write_windows
from tasks.monitor import (
    Champion,
    MonitorError,
    MonitorReport,
    alert_event,
    drift_event,
    fleet_drift_event,
    fleet_verdict,
    monitor_fleet,
    plot,
)
from tests.test_drift import (
    FLEET,
    MONITOR_WINDOWS,
    N_DEVICES,
    SETTINGS,
    T0,
    WINDOW_US,
    build_sim_bundle,
    fleet_after_training,
    summary_of,
    to_us,
    write_fleet_windows,
)
from tinymlops.contracts.events import ALERT_EVENT, DRIFT_EVENT, AlertPayload, DriftPayload
from tinymlops.contracts.topics import FleetTopics
from tinymlops.mqtt import MosquittoBroker, connect, make_client
from tinymlops.schemas import ModelBundle, load_bundle

pytestmark = pytest.mark.slow

FAULT_WINDOW = (T0 + dt.timedelta(hours=1), T0 + dt.timedelta(hours=1, minutes=10))
DRIFT_WINDOW = (T0 + dt.timedelta(hours=2), T0 + dt.timedelta(hours=2, minutes=10))
FAULTY = "node-0003"
IMPORTED = 25


@pytest.fixture(scope="session")
def sim_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return build_sim_bundle(tmp_path_factory.getbasetemp() / "sim-bundle")


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("monitor") / "lake"
    fleet = fleet_after_training()
    fleet.inject_fault(FaultSpec("inner_race", 0.6), [FAULTY])
    # live windows a few minutes before the fault window: outside [since, until), never read
    write_fleet_windows(root, fleet, 5, FAULT_WINDOW[0] - dt.timedelta(minutes=5))
    write_fleet_windows(root, fleet, MONITOR_WINDOWS, FAULT_WINDOW[0])
    # labelled imports inside the window (a loud, drifted recording): not live data, left out
    imported = WindowBatch()
    node = fleet.nodes[0]
    node.simulator.add_drift(DriftSpec("gain", 2.0))
    for k in range(IMPORTED):
        window = node.next_window(to_us(FAULT_WINDOW[0]) + k * WINDOW_US)
        imported.append(FLEET, window, label="normal", source="import:old-recording.csv")
    write_windows(root, imported)

    fleet = fleet_after_training()
    fleet.add_drift(DriftSpec("gain", 0.3))
    write_fleet_windows(root, fleet, MONITOR_WINDOWS, DRIFT_WINDOW[0])
    return root


@pytest.fixture(scope="module")
def fault_report(lake: Path, sim_bundle: ModelBundle) -> MonitorReport:
    since, until = FAULT_WINDOW
    return monitor_fleet(lake, FLEET, sim_bundle, since=since, until=until, settings=SETTINGS)


@pytest.fixture(scope="module")
def drift_report(lake: Path, sim_bundle: ModelBundle) -> MonitorReport:
    since, until = DRIFT_WINDOW
    return monitor_fleet(lake, FLEET, sim_bundle, since=since, until=until, settings=SETTINGS)


def test_faulty_machine_is_found_from_live_windows_only(fault_report: MonitorReport, sim_bundle: ModelBundle) -> None:
    report = fault_report
    assert report.windows_live == N_DEVICES * MONITOR_WINDOWS
    assert report.windows_excluded == IMPORTED
    assert [d.device for d in report.devices] == [f"node-{i:04d}" for i in range(N_DEVICES)]
    assert all(d.n_windows == MONITOR_WINDOWS for d in report.devices)
    assert report.verdict == "fault" and not report.drift_detected
    assert report.fault_devices == [FAULTY] and report.alert_devices == [FAULTY]
    faulty = next(d for d in report.devices if d.device == FAULTY)
    assert faulty.anomaly_rate > 0.9 and faulty.shape is not None and faulty.shape.kind == "impulsive"
    assert report.model_sha256 == sim_bundle.metadata.tflite_sha256
    assert report.threshold == sim_bundle.metadata.threshold


def test_markdown_metrics_and_dict_carry_the_verdicts(fault_report: MonitorReport) -> None:
    markdown = fault_report.to_markdown()
    assert "## Fleet verdict: **fault**" in markdown
    assert f"| {FAULTY} | fault | windows | {MONITOR_WINDOWS} | 100.0% (" in markdown
    assert markdown.count("| ok |") == N_DEVICES - 1
    assert f"alert, no retraining for: {FAULTY}" in markdown
    assert "waveform shape impulsive" in markdown  # the faulty device's reasons
    assert re.search(r"\| band_\d\d \(\d+-\d+ Hz\) \| \d\.\d{3} \|", markdown)  # pooled bands labelled in Hz
    assert f"| psi_threshold | {SETTINGS.psi_threshold} |" in markdown

    metrics = fault_report.metrics()
    assert metrics["fleet.fault_devices"] == 1.0 and metrics["fleet.drift_detected"] == 0.0
    assert metrics["fleet.alert"] == 1.0 and metrics["fleet.windows"] == N_DEVICES * MONITOR_WINDOWS
    assert metrics[f"device.{FAULTY}.anomaly_rate"] > 0.9 and metrics[f"device.{FAULTY}.impulsive_fraction"] > 0.9
    assert metrics["device.node-0000.anomaly_rate"] < 0.1
    assert "pooled.psi.band_00" in metrics and "pooled.ks.crest" in metrics
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())

    data = json.loads(json.dumps(fault_report.to_dict()))
    assert data["assessment"]["verdict"] == "fault" and data["alert_devices"] == [FAULTY]
    assert data["settings"]["fleet_fraction"] == SETTINGS.fleet_fraction
    assert len(data["assessment"]["devices"]) == N_DEVICES


def test_alert_event_names_the_faulty_device_and_is_a_valid_prefect_event(fault_report: MonitorReport) -> None:
    fields = alert_event(fault_report, champion_version="3")
    assert fields["event"] == ALERT_EVENT
    assert fields["resource"]["prefect.resource.id"] == f"tinymlops.fleet.{FLEET}"
    payload = fields["payload"]
    assert set(payload) == AlertPayload.__required_keys__  # the shape the contract defines
    assert payload["fleet"] == FLEET and payload["devices"] == [FAULTY] and payload["champion_version"] == "3"
    assert payload["device_details"][FAULTY]["verdict"] == "fault"
    assert payload["metrics"][f"device.{FAULTY}.anomaly_rate"] > 0.9
    event = Event(**fields)  # what emit_event builds: labels must be strings, ids well-formed
    assert event.resource.id == f"tinymlops.fleet.{FLEET}"
    assert {r.role for r in event.related} == {"model", "device"}
    json.dumps(fields)
    with pytest.raises(MonitorError, match="verdict is fault: no drift to announce"):
        drift_event(fault_report, champion_version="3")


def test_fleet_wide_gain_change_gives_a_drift_event(drift_report: MonitorReport) -> None:
    assert drift_report.verdict == "data_drift" and drift_report.drift_detected
    assert drift_report.alert_devices == [] and len(drift_report.assessment.drift_devices) == N_DEVICES
    fields = drift_event(drift_report, champion_version=None)
    assert fields["event"] == DRIFT_EVENT
    assert fields["resource"]["prefect.resource.id"] == f"tinymlops.fleet.{FLEET}"
    payload = fields["payload"]
    assert set(payload) == DriftPayload.__required_keys__  # what the retraining trigger reads from
    assert payload["fleet"] == FLEET and payload["verdict"] == "data_drift" and payload["champion_version"] is None
    assert payload["devices"] == [f"node-{i:04d}" for i in range(N_DEVICES)] and payload["exclude_devices"] == []
    assert payload["metrics"]["fleet.drift_devices"] == N_DEVICES
    assert Event(**fields).resource["tinymlops.champion-version"] == ""
    with pytest.raises(MonitorError, match="no device to alert about"):
        alert_event(drift_report)


def test_one_drift_event_for_a_fleet_judged_by_two_champions(lake: Path, sim_bundle: ModelBundle) -> None:
    """Two reports over disjoint devices: one drifted, one with a fault; the fleet gets one drift event.

    Its devices are those a retraining should use from both (the faulty one left out), so the
    retraining trains on the whole fleet, not on one profile's devices.
    """
    first, second = [f"node-{i:04d}" for i in range(5)], [f"node-{i:04d}" for i in range(5, N_DEVICES)]
    faulty = monitor_fleet(lake, FLEET, sim_bundle, since=FAULT_WINDOW[0], until=FAULT_WINDOW[1], settings=SETTINGS,
                           devices=first)  # fmt: skip
    drifted = monitor_fleet(lake, FLEET, sim_bundle, since=DRIFT_WINDOW[0], until=DRIFT_WINDOW[1], settings=SETTINGS,
                            exclude=first)  # fmt: skip
    assert [d.device for d in faulty.devices] == first and [d.device for d in drifted.devices] == second
    assert faulty.alert_devices == [FAULTY] and not faulty.drift_detected and drifted.drift_detected
    event = fleet_drift_event([(faulty, "1"), (drifted, "2")])
    payload = event["payload"]
    assert event["event"] == DRIFT_EVENT and payload["champion_version"] == "2"
    assert payload["devices"] == sorted(set(first + second) - {FAULTY}) and payload["exclude_devices"] == [FAULTY]
    assert payload["drift_devices"] == drifted.assessment.drift_devices
    assert Event(**event).payload["devices"] == payload["devices"]  # a valid Prefect event
    with pytest.raises(MonitorError, match="no report found drift"):
        fleet_drift_event([(faulty, "1")])
    assert (fleet_verdict([faulty, drifted]), fleet_verdict([faulty]), fleet_verdict([drifted])) == (
        "mixed", "fault", "data_drift",
    )  # fmt: skip


def test_plot_renders_to_png(fault_report: MonitorReport, drift_report: MonitorReport, tmp_path: Path) -> None:
    for name, report in (("fault", fault_report), ("drift", drift_report)):
        figure = plot(report)
        assert len(figure.axes) == 3
        path = tmp_path / f"{name}.png"
        figure.savefig(path, dpi=60)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_empty_window_bad_windows_and_mismatched_rate(lake: Path, sim_bundle: ModelBundle, tmp_path: Path) -> None:
    early = T0 - dt.timedelta(days=1)
    empty = monitor_fleet(
        lake, FLEET, sim_bundle, since=early, until=early + dt.timedelta(minutes=10), settings=SETTINGS
    )
    assert empty.verdict == "insufficient_data" and empty.devices == () and empty.windows_live == 0
    assert "## Fleet verdict: **insufficient_data**" in empty.to_markdown()
    assert len(plot(empty).axes) == 3
    with pytest.raises(MonitorError, match="not before its end"):
        monitor_fleet(lake, FLEET, sim_bundle, since=DRIFT_WINDOW[1], until=DRIFT_WINDOW[0], settings=SETTINGS)
    with pytest.raises(MonitorError, match="timezone-aware"):
        monitor_fleet(
            lake, FLEET, sim_bundle, since=dt.datetime(2026, 1, 5), until=dt.datetime(2026, 1, 6), settings=SETTINGS
        )

    other_rate = tmp_path / "lake"
    batch = WindowBatch()
    node = fleet_after_training().nodes[0]
    for k in range(3):
        window = node.next_window(to_us(T0) + k * WINDOW_US)
        batch.append(
            FLEET, type(window)(window.device_id, window.seq, window.timestamp_us, 12_000, window.scale, window.samples)
        )
    write_windows(other_rate, batch)
    with pytest.raises(MonitorError, match="sampled at 12000 Hz"):
        monitor_fleet(other_rate, FLEET, sim_bundle, since=T0, until=T0 + dt.timedelta(minutes=1), settings=SETTINGS)


def drift_summary(
    champion: Champion, device: str, samples: np.ndarray, end: dt.datetime, **change: Any
) -> DriftSummary:
    """The summary a device publishes over these windows (the statistics of firmware/device.py), as a message."""
    stats = summary_of(champion, samples)
    fields: dict[str, Any] = {
        "device": device,
        "model": champion.model_name,
        "version": 1,
        "threshold": champion.threshold,
        "start_ts": end.timestamp() - len(samples) * WINDOW_US / 1e6,
        "end_ts": end.timestamp(),
        "windows": stats.windows,
        "anomalies": stats.anomalies,
        "score_mean": 0.0,
        "score_edges": stats.score_edges.tolist(),
        "score_counts": stats.score_counts.tolist(),
        "feature_mean": stats.feature_mean.tolist(),
        "feature_var": stats.feature_var.tolist(),
    }
    return DriftSummary.decode(DriftSummary(**(fields | change)).encode())  # through the wire format


def test_devices_without_windows_are_judged_from_their_summaries(
    lake: Path, sim_bundle: ModelBundle, tmp_path: Path
) -> None:
    """Five devices stream windows, five only publish summaries (two each); one of those has a fault."""
    champion = Champion.from_bundle(sim_bundle)
    since, until = FAULT_WINDOW
    fleet = fleet_after_training()
    fleet.inject_fault(FaultSpec("inner_race", 0.6), ["node-0008"])
    streaming, summarising = fleet.nodes[:5], fleet.nodes[5:]
    root = tmp_path / "lake"
    batch = WindowBatch()
    for k in range(MONITOR_WINDOWS):
        for node in streaming:
            batch.append(FLEET, node.next_window(to_us(since) + k * WINDOW_US))
    write_windows(root, batch)
    summaries = []
    for node in summarising:
        for half in (1, 2):
            samples = np.stack([node.next_window(0).physical() for _ in range(MONITOR_WINDOWS // 2)])
            summaries.append(drift_summary(champion, node.device_id, samples, since + dt.timedelta(minutes=4 * half)))
    samples = np.stack([summarising[0].next_window(0).physical() for _ in range(MONITOR_WINDOWS)])
    ignored = [
        drift_summary(
            champion, "node-0005", samples, since + dt.timedelta(minutes=3), threshold=champion.threshold * 2
        ),
        drift_summary(champion, "node-0005", samples, until + dt.timedelta(minutes=1)),  # ends after the window
        drift_summary(champion, "node-0000", samples, since + dt.timedelta(minutes=3)),  # its windows were scored
    ]

    report = monitor_fleet(
        root, FLEET, sim_bundle, since=since, until=until, settings=SETTINGS, summaries=summaries + ignored
    )
    assert report.summaries_used == 10 and report.summaries_ignored == 3
    sources = {d.device: d.source for d in report.devices}
    assert sources == {n.device_id: "windows" for n in streaming} | {n.device_id: "summary" for n in summarising}
    assert all(d.n_windows == MONITOR_WINDOWS for d in report.devices)
    assert report.verdict == "fault" and report.fault_devices == ["node-0008"] and report.alert_devices == ["node-0008"]
    assert "| node-0008 | fault | summary | 40 |" in report.to_markdown()
    table = {row["device"]: row for row in report.device_table()}  # the monitor flow's table artifact
    assert set(table) == set(sources) and table["node-0008"]["verdict"] == "fault"
    assert table["node-0008"]["source"] == "summary" and table["node-0008"]["windows"] == MONITOR_WINDOWS
    assert report.metrics()["fleet.summaries_used"] == 10.0


@pytest.mark.mlflow
@pytest.mark.prefect
def test_monitor_command_judges_the_fleet_with_the_registered_champion(
    lake: Path, sim_bundle: ModelBundle, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from typer.testing import CliRunner

    from registry.models import register_bundle
    from registry.promotion import promote
    from registry.store import configure_from_settings
    from registry.tracking import log_training_run
    from tasks.datasets import champion_accumulation
    from tinymlops.cli import app
    from tinymlops.settings import get_settings, reset_settings

    monkeypatch.setenv("TINYMLOPS_DATA_DIR", str(lake.parent))  # the lake is <data_dir>/lake
    reset_settings()
    previous = mlflow.get_tracking_uri()
    try:
        run_id = log_training_run(configure_from_settings(get_settings()), params={}, metrics={},
                                  dataset_fingerprint="sim", lake_selection={})  # fmt: skip
        version = register_bundle(sim_bundle, run_id, gates_passed=True)
        promote(version.name, version.version, candidate_eval=None, champion_eval=None, actor="test")
        args = ["monitor", "--fleet", FLEET, "--until", FAULT_WINDOW[1].isoformat(), "--minutes", "10", "--no-events"]
        result = CliRunner().invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output.strip().splitlines()[-1])
        assert report["verdict"] == "fault" and report["alert_devices"] == [FAULTY] and report["events"] == []
        assert report["model"] == f"{version.name}/{version.version}"
        assert report["summaries"] == {"skipped": "no broker configured"}  # and none stored: windows only
        assert "profile unknown" in report["judged_by"][FAULTY]["reason"]  # no device announced itself
        table = CliRunner().invoke(app, args)
        assert table.exit_code == 0 and "fault" in table.output and FAULTY in table.output
        # what a retraining keeps of this champion: its trained spans, from the registry's bundle
        kept = champion_accumulation(f"{version.name}@champion", 1000)
        assert kept is not None and kept.champion == f"{version.name}/{version.version}"
        assert {d: (first, last) for d, first, last in kept.spans_us} == sim_bundle.metadata.trained_span_us
        assert champion_accumulation("no-such-model@champion", 1000) is None  # retrains on the new windows alone
    finally:
        reset_settings()
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)


def announcement(device: str, profile: str) -> Announcement:
    """The retained announcement of a device of ``profile`` (what firmware/device.py publishes)."""
    return Announcement(device=device, fleet=FLEET, firmware="test 1.0", profile=profile, flash_free=1 << 20,
                        slot_bytes=1 << 19, ram_free=1 << 17, max_chunk=1024, dsp_versions=[1, 2], key_ids=["k"],
                        ts=T0.timestamp())  # fmt: skip


@pytest.mark.mlflow
@pytest.mark.prefect
def test_monitor_flow_collects_summaries_and_judges_each_profile_by_its_champion(
    sim_bundle: ModelBundle,
    prefect_harness: None,
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two devices stream windows; three only publish summaries, through a real broker; two profiles, two champions.

    node-0000 (nrf52840) and node-0001 (no announcement) stream windows; node-0005 and node-0008
    (rp2040, node-0008 with an inner-race fault) and node-0006 (nrf52840) publish two summaries each,
    of their own champion. One summary arrives twice. The flow must store each once, judge the
    rp2040 devices with the rp2040 champion (today's monitor ignores their summaries: another model)
    and node-0001 with the first target's, saying why.
    """
    import mlflow
    import paho.mqtt.client as mqtt

    from flows.monitor import monitor_flow
    from registry.models import register_bundle
    from registry.promotion import promote
    from registry.store import configure_from_settings
    from registry.tracking import log_training_run
    from tasks.summaries import SummaryStore, collect_summaries, summary_store_path
    from tinymlops.settings import get_settings, reset_settings

    rp2040_bundle = load_bundle(sim_bundle.directory.parent / "rp2040")
    champions = {"nrf52840": Champion.from_bundle(sim_bundle), "rp2040": Champion.from_bundle(rp2040_bundle)}
    assert champions["nrf52840"].model_name != champions["rp2040"].model_name
    monkeypatch.setenv("TINYMLOPS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TINYMLOPS_TARGETS__DEFAULT", '["nrf52840"]')  # judges devices of unknown profile
    reset_settings()
    previous = mlflow.get_tracking_uri()
    since, until = FAULT_WINDOW
    fleet = fleet_after_training()
    fleet.inject_fault(FaultSpec("inner_race", 0.6), ["node-0008"])
    nodes = {node.device_id: node for node in fleet.nodes}
    try:
        settings = get_settings()
        run_id = log_training_run(configure_from_settings(settings), params={}, metrics={},
                                  dataset_fingerprint="sim", lake_selection={})  # fmt: skip
        for bundle in (sim_bundle, rp2040_bundle):
            version = register_bundle(bundle, run_id, gates_passed=True)
            promote(version.name, version.version, candidate_eval=None, champion_eval=None, actor="test")
        batch = WindowBatch()
        for k in range(MONITOR_WINDOWS):
            for device in ("node-0000", "node-0001"):
                batch.append(FLEET, nodes[device].next_window(to_us(since) + k * WINDOW_US))
        write_windows(settings.lake_root, batch)

        topics = FleetTopics(FLEET, settings.mqtt.topic_root)
        store = SummaryStore(summary_store_path(settings.data_dir))
        # the first collection opens the persistent session: from then on the broker keeps the summaries
        assert collect_summaries(mosquitto.address, topics, store, seconds=5, quiet_s=0.2).summaries_received == 0
        profiles = {"node-0000": "nrf52840", "node-0005": "rp2040", "node-0006": "nrf52840", "node-0008": "rp2040"}
        messages = [(topics.announce(d), announcement(d, p).encode(), True) for d, p in profiles.items()]
        for device in ("node-0005", "node-0006", "node-0008"):
            champion = champions[profiles[device]]
            for half in (1, 2):
                samples = np.stack([nodes[device].next_window(0).physical() for _ in range(MONITOR_WINDOWS // 2)])
                end = since + dt.timedelta(minutes=4 * half)
                fallback = 3 if device == "node-0005" else 0
                summary = drift_summary(champion, device, samples, end, speed_fallback=fallback)
                messages.append((topics.summary(device), summary.encode(), False))
        messages.append(messages[-1])  # a re-publish: stored once
        publisher = make_client(mosquitto.address, "test-devices")
        connect(publisher, mosquitto.address)
        infos: list[mqtt.MQTTMessageInfo] = [publisher.publish(t, p, qos=1, retain=r) for t, p, r in messages]
        for info in infos:
            info.wait_for_publish(30)
        publisher.disconnect()
        publisher.loop_stop()

        result = monitor_flow(fleet=FLEET, until=until, window_minutes=10, emit_events=False, summary_seconds=60,
                              broker_url=mosquitto.address.url)  # fmt: skip
    finally:
        reset_settings()
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)

    collected = result["summaries"]
    assert (collected["summaries_stored"], collected["duplicates"]) == (6, 1)
    assert collected["announcements"] == 8  # each twice: queued for the session, and retained on its subscription
    assert collected["speed_fallback"] == {"node-0005": 6, "node-0006": 0, "node-0008": 0}
    by_profile = {report["profile"]: report for report in result["reports"]}
    assert by_profile["rp2040"]["model"] == "vibration-ae-rp2040/1"
    assert by_profile["nrf52840"]["model"] == "vibration-ae-nrf52840/1"
    devices = {d["device"]: (p, d) for p, r in by_profile.items() for d in r["assessment"]["devices"]}
    assert {device: p for device, (p, _) in devices.items()} == {
        "node-0000": "nrf52840", "node-0001": "nrf52840", "node-0006": "nrf52840",
        "node-0005": "rp2040", "node-0008": "rp2040",
    }  # fmt: skip
    assert {device: d["source"] for device, (_, d) in devices.items()} == {
        "node-0000": "windows", "node-0001": "windows", "node-0005": "summary", "node-0006": "summary",
        "node-0008": "summary",
    }  # fmt: skip
    verdicts = {device: d["verdict"] for device, (_, d) in devices.items()}
    assert verdicts == {
        "node-0000": "ok",
        "node-0001": "ok",
        "node-0005": "ok",
        "node-0006": "ok",
        "node-0008": "fault",
    }
    assert devices["node-0005"][1]["speed_fallback"] == 6 and devices["node-0005"][1]["n_windows"] == MONITOR_WINDOWS
    assert result["verdict"] == "fault" and result["alert_devices"] == ["node-0008"]
    assert by_profile["rp2040"]["summaries_used"] == 4 and by_profile["nrf52840"]["summaries_used"] == 2
    judged = result["judged_by"]
    assert judged["node-0008"] == {"profile": "rp2040", "model": "vibration-ae-rp2040/1",
                                   "reason": "the champion of its profile rp2040"}  # fmt: skip
    assert judged["node-0001"]["profile"] is None and "profile unknown" in judged["node-0001"]["reason"]
    assert judged["node-0001"]["model"] == "vibration-ae-nrf52840/1"
    # the store outlives the process: a new one over the same file has every summary, once
    reopened = SummaryStore(summary_store_path(tmp_path / "data"))
    assert len(reopened.summaries(FLEET, since.timestamp(), until.timestamp())) == 6
    assert reopened.profiles(FLEET) == profiles
