"""``tinymlops models``: list, show, promote and roll back the registered models in MLflow.

A Typer sub-app that :mod:`tinymlops.cli` mounts as ``models``. Each command configures MLflow
from the settings first; domain errors propagate as :class:`~tinymlops.errors.TinyMLOpsError`
subclasses, which ``tinymlops.cli.main`` prints as one line with exit code 1.

A promotion from the command line follows ``registry/PROMOTION.md``: it needs the same-run
comparison with the current champion that the train flow records on the version (``eval.*``
tags), or ``--force`` with a ``--reason``.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tinymlops.settings import get_settings
from tinymlops.terminal import make_console

models_app = typer.Typer(
    help="Registered models in MLflow: list, show, promote, roll back.", no_args_is_help=True, add_completion=False
)
console = make_console()

_ActorOption = Annotated[str | None, typer.Option(help="Who acts (recorded; default the OS user).")]


def _configure() -> None:
    from registry.store import configure_from_settings

    configure_from_settings(get_settings())


def _local_store(tracking_uri: str) -> Path | None:
    """The SQLite file of a local tracking URI (``sqlite:///path``), or None for a server or other store."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (containers)
        return "unknown"


def _table(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print(f"{title}: (none)")
        return
    table = Table(title=title, title_justify="left")
    for column in rows[0]:
        table.add_column(str(column), overflow="fold")  # names, URIs and hashes wrap instead of being cut
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


@models_app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the registered models (one per MCU target) with their aliases."""
    settings = get_settings()
    store = _local_store(settings.mlflow_tracking_uri)
    if store is not None and not store.exists():  # reading must not create an empty store
        if as_json:
            print("[]")
        else:
            console.print(f"registered models: (none): no model store at {store}")
        demo_store = settings.data_dir / "demo" / "mlflow.db"
        if not as_json and demo_store.exists():
            console.print(f"the demo's models are in its store: tinymlops --data-dir {demo_store.parent} models list")
        return
    _configure()
    from registry.models import CANDIDATE, CHAMPION, PREVIOUS, list_models

    rows = [
        {
            "model": m.name,
            "versions": m.versions,
            "latest": m.latest_version or "",
            CHAMPION: m.aliases.get(CHAMPION, ""),
            CANDIDATE: m.aliases.get(CANDIDATE, ""),
            PREVIOUS: m.aliases.get(PREVIOUS, ""),
            "updated": m.updated_at,
        }
        for m in list_models()
    ]
    if as_json:
        print(json.dumps(rows))
        return
    _table("Registered models", rows)


@models_app.command("show")
def show_command(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME/VERSION.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show one version: aliases, verdicts, figures, lineage and where its artifacts are."""
    _configure()
    from registry.models import METRIC_TAG_PREFIX, describe
    from registry.promotion import HISTORY_TAG_PREFIX, promotion_history

    version = describe(ref)
    history = [r.to_dict() for r in promotion_history(version.name) if r.version == version.version]
    if as_json:
        print(json.dumps({**version.to_dict(), "metrics": version.metrics, "promotions": history}))
        return
    summary = {
        "model": version.name,
        "version": version.version,
        "aliases": ", ".join(version.aliases) or "(none)",
        "target": version.target or "",
        "gates passed": version.gates_passed,
        "status": version.status,
        "created": version.created_at,
        "training run": version.run_id or "",
        "artifacts": version.artifact_uri,
        "load with": f"mlflow.pyfunc.load_model({version.uri!r})",
    }
    _table(f"{version.name}/{version.version}", [{"field": k, "value": v} for k, v in summary.items()])
    _table("Metrics", [{"metric": k, "value": f"{v:.6g}"} for k, v in sorted(version.metrics.items())])
    tags = {k: v for k, v in version.tags.items() if not k.startswith((METRIC_TAG_PREFIX, HISTORY_TAG_PREFIX))}
    _table("Tags", [{"tag": k, "value": v} for k, v in sorted(tags.items())])
    _table(
        "Promotions, refusals and rollbacks", [{k: r[k] for k in ("at", "action", "actor", "reason")} for r in history]
    )


@models_app.command("promote")
def promote_command(
    ref: Annotated[str, typer.Argument(help="NAME/VERSION (or NAME@candidate) to make the champion.")],
    force: Annotated[
        bool, typer.Option(help="Override the comparison with the champion (needs --reason); never the gates.")
    ] = False,
    reason: Annotated[str | None, typer.Option(help="Why; recorded, required with --force.")] = None,
    actor: _ActorOption = None,
) -> None:
    """Make a version the champion, if it passed its gates and beats the champion (or --force --reason)."""
    _configure()
    from registry.errors import PromotionError
    from registry.models import CHAMPION, aliases_of, describe
    from registry.promotion import AbsoluteGates, promote, recorded_comparison

    version = describe(ref)
    champion = aliases_of(version.name).get(CHAMPION)
    candidate_eval, champion_eval = recorded_comparison(version)
    if champion is not None and champion != version.version and champion_eval is None and not force:
        raise PromotionError(
            f"{version.name}/{version.version} has no comparison with the champion (version {champion}) recorded by "
            "the train flow (eval.* tags): promote with --force --reason TEXT"
        )
    record = promote(
        version.name,
        version.version,
        candidate_eval=candidate_eval,
        champion_eval=champion_eval,
        actor=_actor(actor),
        reason=reason or "",
        force=force,
        gates=AbsoluteGates.from_tags(version.tags),
    )
    forced = " (forced)" if record.forced and not record.rule_passed else ""
    console.print(
        f"{record.name}: champion is now version {record.version}{forced}; previous: {record.from_version or '(none)'}",
        highlight=False,
    )
    for check in record.checks:
        console.print(f"  - {check}", highlight=False)


@models_app.command("rollback")
def rollback_command(
    name: Annotated[str, typer.Argument(help="Registered model name, e.g. vibration-ae-nrf52840.")],
    reason: Annotated[str, typer.Option(help="Why; recorded.")],
    actor: _ActorOption = None,
) -> None:
    """Move the champion back to the previous champion."""
    _configure()
    from registry.promotion import rollback

    record = rollback(name, actor=_actor(actor), reason=reason)
    console.print(
        f"{record.name}: champion is back to version {record.version} (was {record.from_version or '(none)'})",
        highlight=False,
    )
