"""The rule tester: a rule written in TOML, tried on stored series, without touching the running config.

The rule is compiled exactly as ``dicom-node rules check`` compiles the config's rules (the configured
destinations, command plugins and installed plugins, each plugin checking its parameters), so an error
names the key to change as ``rules check`` would. Each chosen series is then evaluated as ``dicom-node
rules explain`` evaluates it (its latest revision's facts), with the rule on its own: the configured
rules are neither consulted (a configured rule's ``stop`` does not hide it here) nor changed.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.config import Config, ConfigError
from node.decide.explain import rule_lines
from node.decide.facts import series_snapshot
from node.decide.rules import RuleSet
from node.index.models import Series, aware

#: Where errors say the rule came from (``invalid rules in the rule tester: rules[0] ("x").match...``).
SOURCE = "the rule tester"
#: The most series one test evaluates (each reads one stored file).
MAX_SERIES = 200


class RuleTest(BaseModel):
    """``POST /api/rules/test``: a rule in TOML and the stored series to try it on."""

    rule_toml: str = Field(
        max_length=100_000,
        description="one or more [[rules]] tables, or one rule's keys (name, match, actions, ...) as a bare table",
    )
    series_uids: list[str] = Field(default_factory=list, max_length=MAX_SERIES)


class SeriesVerdict(BaseModel):
    series_uid: str
    modality: str = ""
    description: str = ""
    revision: int = 0
    matched: list[str] = Field(default_factory=list, description="the tested rules that matched this series")
    explanation: list[str] = Field(default_factory=list, description="each tested rule and why it (did not) match")
    error: str = ""


class RuleTestReport(BaseModel):
    rules: list[str] = Field(description="the tested rules' names, in evaluation order")
    errors: list[str] = Field(description="what is wrong with the TOML or the rule, each naming its key")
    series: list[SeriesVerdict]


class RuleTestError(ValueError):
    """The rule cannot be tested: ``errors`` say what to change."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def rule_tables(text: str) -> list[dict[str, Any]]:
    """The rule tables in ``text``: its ``[[rules]]`` tables, or the text itself as one rule's keys."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RuleTestError([f"not valid TOML: {e}"]) from None
    if "rules" in data:
        other = sorted(k for k in data if k != "rules")
        if other:
            raise RuleTestError(
                [f"only rules are tested here: remove {', '.join(other)} (or write the rule as [[rules]] tables)"]
            )
        tables = data["rules"]
        if not isinstance(tables, list) or not tables:
            raise RuleTestError(["rules: write each rule as a [[rules]] table"])
        return tables
    if not data:
        raise RuleTestError(['no rule: write a [[rules]] table, or a rule\'s keys (name = "...", [match], ...)'])
    return [data]


def compile_test_rules(cfg: Config, tables: list[dict[str, Any]]) -> RuleSet:
    """``tables`` compiled as ``rules check`` compiles the config's rules; the config itself is not changed."""
    from node.decide.compile import compile_rules  # discovers the plugins: only when a rule is tested

    trial = cfg.model_copy(update={"rules": tables})
    try:
        return compile_rules(trial, source=SOURCE)
    except ConfigError as e:
        raise RuleTestError([line for line in str(e).splitlines() if line.strip()]) from None


@dataclass
class SeriesChoice:
    """A stored series offered in the tester's list."""

    series_uid: str
    modality: str
    description: str
    instances: int
    received: str
    label: str = field(init=False)

    def __post_init__(self) -> None:
        self.label = f'{self.modality} "{self.description}" ({self.instances} inst., {self.received}) {self.series_uid}'


def recent_series(engine: Engine, limit: int = MAX_SERIES) -> list[SeriesChoice]:
    """The most recently received series (no patient data: the list is shown whatever redact_phi says)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                Series.series_instance_uid,
                Series.modality,
                Series.series_description,
                Series.instance_count,
                Series.last_received_at,
            )
            .where(Series.series_instance_uid != "")
            .order_by(Series.last_received_at.desc(), Series.id.desc())
            .limit(limit)
        ).all()
    return [
        SeriesChoice(uid, modality, description, n, f"{aware(last):%Y-%m-%d %H:%M} UTC")
        for uid, modality, description, n, last in rows
    ]


def _verdict(session: Session, cfg: Config, ruleset: RuleSet, uid: str) -> SeriesVerdict:
    sid = session.execute(select(Series.id).where(Series.series_instance_uid == uid)).scalar()
    if sid is None:
        return SeriesVerdict(series_uid=uid, error=f"no series {uid} in the index")
    try:
        snap = series_snapshot(session, cfg.data_dir, sid)
    except Exception as e:  # a file gone or damaged: said for this series, the others are still tested
        return SeriesVerdict(series_uid=uid, error=f"cannot read its first instance: {type(e).__name__}: {e}")
    if snap is None:
        return SeriesVerdict(series_uid=uid, error="no instance of the series is stored (discarded?)")
    results = ruleset.evaluate(snap.facts)
    return SeriesVerdict(
        series_uid=uid,
        modality=snap.modality,
        description=snap.description,
        revision=snap.revision,
        matched=[r.rule.name for r in results if r.fired],
        explanation=list(rule_lines(results, indent="")),
    )


def try_rule(cfg: Config, reader: Engine, request: RuleTest) -> RuleTestReport:
    """Compile the rule and evaluate it on each series; a bad rule is a report with ``errors``, not an exception."""
    try:
        ruleset = compile_test_rules(cfg, rule_tables(request.rule_toml))
    except RuleTestError as e:
        return RuleTestReport(rules=[], errors=e.errors, series=[])
    uids = list(dict.fromkeys(u.strip() for u in request.series_uids if u.strip()))
    with Session(reader) as s:
        verdicts = [_verdict(s, cfg, ruleset, uid) for uid in uids]
    return RuleTestReport(rules=[r.name for r in ruleset], errors=[], series=verdicts)
