"""Promotion and rollback of registered versions: the written rule, enforced and recorded.

The rule (also in ``registry/PROMOTION.md``). A version of a target's registered model may become
``champion`` (what devices of that target run) when:

1. it passed the budget gate for its target and every other gate at registration
   (``gates_passed`` and ``budget_passed`` version tags); a version that failed a gate can never
   become ``candidate`` or ``champion``, not even forced;
2. it is no worse than the current champion on the same evaluation set, both evaluated in the
   same run (the train flow passes both evaluations): int8 ROC-AUC not lower than the
   champion's by more than :data:`AUC_TOLERANCE` (0.005), and false alarms per hour not higher
   than the champion's by more than :data:`FALSE_ALARM_RELATIVE_TOLERANCE` (10 %) or
   :data:`FALSE_ALARM_ABSOLUTE_TOLERANCE` (1 per hour), whichever is larger. With no champion
   yet, (2) does not apply;
3. it meets the absolute gates configured for it (:class:`AbsoluteGates`, the training config's
   ``gates``), whatever the champion does: at least ``min_calibration_windows`` windows behind its
   threshold, and the one-sided upper confidence bound of its false-alarm rate on held-out normal
   windows at most ``max_false_alarm_rate``. A version that misses them stays a candidate, with the
   reason in the ``promotion_refused`` tag and a ``refuse`` record;

unless forced, which needs a reason and is recorded as forced (conditions 1 and 3 still hold).

Promoting moves ``champion`` to the version, the old champion to ``previous``, and removes
``candidate`` if it pointed at the version. Rolling back moves ``champion`` to ``previous`` and
removes ``previous`` (one level of undo: a second rollback needs an explicit promotion).

Every promotion and rollback is recorded in the registry itself, visible in the MLflow UI:
version tags on the version that became champion (``promoted_at``, ``promoted_by``,
``promotion_reason``, ``promotion_forced``, ``promotion_rule``, ``promoted_from``; for a rollback
``restored_at/by/reason`` on the restored version, ``rolled_back_at/by/reason`` on the one replaced) and one
registered-model tag per event, ``promotion.<UTC timestamp>``, holding the
:class:`PromotionRecord` as JSON (:func:`promotion_history` reads them back).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from registry.errors import PromotionError
from registry.models import CANDIDATE, CHAMPION, PREVIOUS, ModelRef, RegisteredVersion, aliases_of, get_version
from registry.store import mlflow_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

AUC_TOLERANCE = 0.005
"""The candidate's int8 ROC-AUC may be at most this much below the champion's."""
FALSE_ALARM_RELATIVE_TOLERANCE = 0.10
"""The candidate's false alarms per hour may exceed the champion's by this fraction ..."""
FALSE_ALARM_ABSOLUTE_TOLERANCE = 1.0
"""... or by this many per hour, whichever is larger."""

EVAL_AUC = "auc_int8"
EVAL_FALSE_ALARMS = "false_alarms_per_hour"
EVAL_VERSION = "version"
EVAL_FALSE_ALARM_UPPER = "false_alarm_upper"
EVAL_FALSE_POSITIVES = "false_positives"
EVAL_NORMAL_WINDOWS = "n_normal"
EVAL_CONFIDENCE = "confidence"
EVAL_CALIBRATION_WINDOWS = "calibration_windows"
GATE_FIGURES = (EVAL_FALSE_ALARM_UPPER, EVAL_FALSE_POSITIVES, EVAL_NORMAL_WINDOWS, EVAL_CONFIDENCE,
                EVAL_CALIBRATION_WINDOWS)  # fmt: skip
"""The candidate's own figures the absolute gates judge (held-out normal windows, calibration size)."""
EVAL_TAG_PREFIX = "eval."
"""Version tags in which the train flow records the same-run comparison with the champion."""
HISTORY_TAG_PREFIX = "promotion."


@dataclass(frozen=True)
class AbsoluteGates:
    """Limits a version must meet to be promoted, whatever the champion does (condition 3).

    Attributes:
        max_false_alarm_rate: Largest upper confidence bound of the false-alarm rate on held-out
            normal windows.
        min_calibration_windows: Fewest calibration windows behind the threshold.
    """

    max_false_alarm_rate: float
    min_calibration_windows: int

    def to_tags(self) -> dict[str, str]:
        """The gates as ``eval.*`` version tags, so a later CLI promotion applies the same limits."""
        return {f"{EVAL_TAG_PREFIX}{key}": str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> AbsoluteGates | None:
        """Read :meth:`to_tags` back; None for a version registered before the gates existed."""
        try:
            return cls(
                float(tags[f"{EVAL_TAG_PREFIX}max_false_alarm_rate"]),
                int(tags[f"{EVAL_TAG_PREFIX}min_calibration_windows"]),
            )
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class PromotionDecision:
    """Whether the rule allows a promotion, with every check in words.

    ``blocking`` are the failures that forcing cannot override (conditions 1 and 3).
    """

    allowed: bool
    reasons: tuple[str, ...]
    failures: tuple[str, ...] = ()
    blocking: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromotionRecord:
    """One promotion or rollback as recorded in the registry."""

    action: str
    name: str
    version: str
    from_version: str | None
    actor: str
    reason: str
    forced: bool
    rule_passed: bool
    at: str
    checks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {**asdict(self), "checks": list(self.checks)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromotionRecord:
        """Build a record from :meth:`to_dict` output."""
        return cls(**{**data, "checks": tuple(data.get("checks", ()))})


def _figure(evaluation: Mapping[str, Any], key: str, who: str, failures: list[str]) -> float | None:
    value = evaluation.get(key)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        failures.append(f"{who} evaluation has no numeric {key} (got {value!r})")
        return None
    if not math.isfinite(number):
        failures.append(f"{who} {key} is {number}")
        return None
    return number


def _absolute_checks(
    candidate_eval: Mapping[str, Any] | None, gates: AbsoluteGates, reasons: list[str], failures: list[str]
) -> None:
    if candidate_eval is None:
        failures.append("no held-out evaluation of the candidate to check the absolute gates with")
        return
    windows = _figure(candidate_eval, EVAL_CALIBRATION_WINDOWS, "candidate", failures)
    if windows is not None:
        minimum = gates.min_calibration_windows
        if windows >= minimum:
            reasons.append(f"{windows:.0f} calibration windows (minimum {minimum})")
        else:
            failures.append(f"too few calibration windows behind the threshold: {windows:.0f} < minimum {minimum}")
    upper = _figure(candidate_eval, EVAL_FALSE_ALARM_UPPER, "candidate", failures)
    if upper is not None:
        seen = (
            f"{candidate_eval.get(EVAL_FALSE_POSITIVES, '?')} of {candidate_eval.get(EVAL_NORMAL_WINDOWS, '?')} "
            "held-out normal windows"
        )
        confidence = candidate_eval.get(EVAL_CONFIDENCE)
        bound = f"upper bound {upper:.2%}" + (f" at {float(confidence):.0%} confidence" if confidence else "")
        limit = gates.max_false_alarm_rate
        if upper <= limit:
            reasons.append(f"false alarms on {seen}: {bound} <= limit {limit:.2%}")
        else:
            failures.append(f"false-alarm rate above the limit: {seen} flagged, {bound} > limit {limit:.2%}")


def decide_promotion(
    candidate_eval: Mapping[str, Any] | None,
    champion_eval: Mapping[str, Any] | None,
    budget_passed: bool,
    gates: AbsoluteGates | None = None,
) -> PromotionDecision:
    """Apply the promotion rule to a candidate's and the current champion's same-run evaluations.

    Args:
        candidate_eval: The candidate's figures: ``auc_int8`` and ``false_alarms_per_hour``, and
            for the absolute gates those of :data:`GATE_FIGURES`.
        champion_eval: The current champion's figures on the same windows in the same run, or
            None when there is no champion.
        budget_passed: Whether the candidate passed the budget gate (and every other gate).
        gates: The absolute gates (condition 3); None: not checked (a version registered before
            the gates existed).

    Returns:
        The decision; ``failures`` lists each violated condition, ``blocking`` those of conditions 1 and 3.

    """
    reasons: list[str] = []
    failures: list[str] = []
    blocking: list[str] = []
    if budget_passed:
        reasons.append("passed the budget gate")
    else:
        blocking.append("failed the budget gate")
    if champion_eval is None:
        reasons.append("no current champion to compare with")
    elif candidate_eval is None:
        failures.append("no evaluation of the candidate on the champion's evaluation set")
    else:
        auc = _figure(candidate_eval, EVAL_AUC, "candidate", failures)
        champion_auc = _figure(champion_eval, EVAL_AUC, "champion", failures)
        far = _figure(candidate_eval, EVAL_FALSE_ALARMS, "candidate", failures)
        champion_far = _figure(champion_eval, EVAL_FALSE_ALARMS, "champion", failures)
        if auc is not None and champion_auc is not None:
            text = f"int8 AUC {auc:.4f} vs champion {champion_auc:.4f} (tolerance {AUC_TOLERANCE})"
            (reasons if auc >= champion_auc - AUC_TOLERANCE else failures).append(text)
        if far is not None and champion_far is not None:
            allowed = champion_far + max(FALSE_ALARM_ABSOLUTE_TOLERANCE, FALSE_ALARM_RELATIVE_TOLERANCE * champion_far)
            text = f"false alarms {far:.2f}/h vs champion {champion_far:.2f}/h (at most {allowed:.2f}/h)"
            (reasons if far <= allowed else failures).append(text)
    if gates is not None:
        _absolute_checks(candidate_eval, gates, reasons, blocking)
    failures += blocking
    return PromotionDecision(not failures, tuple(reasons + failures), tuple(failures), tuple(blocking))


def _now() -> str:
    return dt.datetime.now(tz=dt.UTC).isoformat(timespec="microseconds")


def _history_key(at: str) -> str:
    return HISTORY_TAG_PREFIX + dt.datetime.fromisoformat(at).strftime("%Y%m%dT%H%M%S.%fZ")


def _record(client: MlflowClient, record: PromotionRecord) -> None:
    client.set_registered_model_tag(record.name, _history_key(record.at), json.dumps(record.to_dict()))
    log.info(
        "%s %s/%s (from %s) by %s%s: %s",
        record.action,
        record.name,
        record.version,
        record.from_version or "none",
        record.actor,
        " FORCED" if record.forced else "",
        record.reason,
    )


def _refuse_gate_failures(version: RegisteredVersion) -> None:
    if not version.gates_passed:
        raise PromotionError(
            f"{version.name}/{version.version} failed its gates at registration (budget_passed="
            f"{version.tags.get('budget_passed')}, gates_passed={version.tags.get('gates_passed')}): "
            "it can never be candidate or champion, not even forced"
        )


def promote(
    name: str,
    version: str,
    *,
    candidate_eval: Mapping[str, Any] | None,
    champion_eval: Mapping[str, Any] | None,
    actor: str,
    reason: str = "",
    force: bool = False,
    gates: AbsoluteGates | None = None,
) -> PromotionRecord:
    """Make a version the champion of its registered model, if the rule allows it (or forced).

    Args:
        name: Registered model name.
        version: The version to promote.
        candidate_eval: Its figures (``auc_int8``, ``false_alarms_per_hour``).
        champion_eval: The current champion's figures on the same set in the same run; may carry
            ``version``, which must then be the current champion. Ignored when there is no champion.
        actor: Who promotes (user name, flow run).
        reason: Why; required when forced.
        force: Override condition 2 of the rule (never conditions 1 and 3).
        gates: The absolute gates the version was registered under (condition 3); None: not checked.

    Returns:
        The record written to the registry.

    Raises:
        ModelNotFoundError: No such model or version.
        PromotionError: The version failed a gate, misses an absolute gate, is already champion,
            the rule refuses and it is not forced, or it is forced without a reason.

    """
    client = mlflow_client()
    target = get_version(ModelRef(name, version=str(version)), client)
    _refuse_gate_failures(target)
    aliases = aliases_of(name)
    champion = aliases.get(CHAMPION)
    if champion == target.version:
        raise PromotionError(f"{name}/{target.version} is already the {CHAMPION}")
    decision = decide_promotion(candidate_eval, champion_eval if champion else None, budget_passed=True, gates=gates)
    if decision.blocking:
        raise PromotionError(
            f"promotion of {name}/{target.version} refused: {'; '.join(decision.blocking)} (not even forced)"
        )
    if champion is not None:
        extra = []
        if champion_eval is None:
            extra.append(f"no evaluation of the current champion {name}/{champion} on the same set was given")
        elif EVAL_VERSION in champion_eval and str(champion_eval[EVAL_VERSION]) != champion:
            compared = champion_eval[EVAL_VERSION]
            extra.append(f"the comparison was made with version {compared}, the champion is now {champion}")
        if extra:
            decision = PromotionDecision(False, decision.reasons + tuple(extra), decision.failures + tuple(extra))
    if not decision.allowed and not force:
        raise PromotionError(
            f"promotion of {name}/{target.version} refused: {'; '.join(decision.failures)} "
            "(force it with a reason to override)"
        )
    if force and not reason.strip():
        raise PromotionError(f"forcing the promotion of {name}/{target.version} needs a reason")
    record = PromotionRecord(
        action="promote",
        name=name,
        version=target.version,
        from_version=champion,
        actor=actor,
        reason=reason.strip() or "passed the promotion rule",
        forced=force,
        rule_passed=decision.allowed,
        at=_now(),
        checks=decision.reasons,
    )
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS, champion)
    client.set_registered_model_alias(name, CHAMPION, target.version)
    if aliases.get(CANDIDATE) == target.version:
        client.delete_registered_model_alias(name, CANDIDATE)
    for key, value in {
        "promoted_at": record.at,
        "promoted_by": actor,
        "promotion_reason": record.reason,
        "promotion_forced": str(force).lower(),
        "promotion_rule": "; ".join(decision.reasons)[:5000],
        "promoted_from": champion or "",
    }.items():
        client.set_model_version_tag(name, target.version, key, value)
    _record(client, record)
    return record


def record_refusal(name: str, version: str, decision: PromotionDecision, *, actor: str) -> PromotionRecord:
    """Record that the rule kept a version a candidate: the ``promotion_refused`` tag and a ``refuse`` record."""
    client = mlflow_client()
    record = PromotionRecord(
        action="refuse",
        name=name,
        version=str(version),
        from_version=aliases_of(name).get(CHAMPION),
        actor=actor,
        reason="; ".join(decision.failures),
        forced=False,
        rule_passed=False,
        at=_now(),
        checks=decision.reasons,
    )
    client.set_model_version_tag(name, record.version, "promotion_refused", record.reason[:5000])
    _record(client, record)
    return record


def rollback(name: str, *, actor: str, reason: str) -> PromotionRecord:
    """Move ``champion`` back to ``previous`` and remove ``previous``.

    Raises:
        ModelNotFoundError: No such registered model.
        PromotionError: No previous champion, or no reason given.

    """
    if not reason.strip():
        raise PromotionError(f"rolling back {name} needs a reason")
    client = mlflow_client()
    aliases = aliases_of(name)
    previous = aliases.get(PREVIOUS)
    if previous is None:
        raise PromotionError(f"{name} has no {PREVIOUS} champion to roll back to")
    restored = get_version(ModelRef(name, version=previous), client)
    _refuse_gate_failures(restored)
    current = aliases.get(CHAMPION)
    record = PromotionRecord(
        action="rollback",
        name=name,
        version=previous,
        from_version=current,
        actor=actor,
        reason=reason.strip(),
        forced=False,
        rule_passed=True,
        at=_now(),
    )
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    stamp = {"at": record.at, "by": actor, "reason": record.reason}
    for key, value in stamp.items():
        client.set_model_version_tag(name, previous, f"restored_{key}", value)
        if current is not None:
            client.set_model_version_tag(name, current, f"rolled_back_{key}", value)
    _record(client, record)
    return record


def promotion_history(name: str) -> list[PromotionRecord]:
    """Every recorded promotion and rollback of a registered model, oldest first."""
    from mlflow.exceptions import MlflowException

    from registry.errors import ModelNotFoundError

    try:
        tags = mlflow_client().get_registered_model(name).tags or {}
    except MlflowException:
        raise ModelNotFoundError(f"no registered model {name!r}") from None
    return [
        PromotionRecord.from_dict(json.loads(value))
        for key, value in sorted(tags.items())
        if key.startswith(HISTORY_TAG_PREFIX)
    ]


def record_comparison(
    name: str,
    version: str,
    *,
    candidate_eval: Mapping[str, Any],
    champion_eval: Mapping[str, Any] | None,
    champion_version: str | None,
    gates: AbsoluteGates | None = None,
) -> None:
    """Record on a version the same-run comparison with the champion (``eval.*`` tags), for a later CLI promotion.

    The candidate's :data:`GATE_FIGURES` and the ``gates`` are recorded too, so that the CLI applies
    the absolute gates the version was registered under.
    """
    client = mlflow_client()
    keys = (EVAL_AUC, EVAL_FALSE_ALARMS, *(key for key in GATE_FIGURES if key in candidate_eval))
    tags: dict[str, Any] = {f"{EVAL_TAG_PREFIX}{key}": candidate_eval[key] for key in keys}
    tags |= gates.to_tags() if gates is not None else {}
    if champion_eval is not None and champion_version is not None:
        tags[f"{EVAL_TAG_PREFIX}champion_version"] = champion_version
        tags.update({f"{EVAL_TAG_PREFIX}champion_{key}": champion_eval[key] for key in (EVAL_AUC, EVAL_FALSE_ALARMS)})
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def recorded_comparison(version: RegisteredVersion) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Read back the ``eval.*`` tags: the candidate's and the champion's evaluations (None where absent)."""
    tags = version.tags

    def figures(prefix: str) -> dict[str, Any] | None:
        keys: tuple[str, ...] = (EVAL_AUC, EVAL_FALSE_ALARMS)
        if not all(f"{EVAL_TAG_PREFIX}{prefix}{key}" in tags for key in keys):
            return None
        keys += tuple(key for key in GATE_FIGURES if f"{EVAL_TAG_PREFIX}{prefix}{key}" in tags)
        return {key: tags[f"{EVAL_TAG_PREFIX}{prefix}{key}"] for key in keys}

    candidate = figures("")
    champion = figures("champion_")
    if champion is not None and f"{EVAL_TAG_PREFIX}champion_version" in tags:
        champion[EVAL_VERSION] = tags[f"{EVAL_TAG_PREFIX}champion_version"]
    elif champion is not None:
        champion = None  # a comparison that does not say with which version proves nothing
    return candidate, champion
