"""Study rules (``scope = "study"``) on the series tracker: no node process, no network.

A study's series are made from the real shared CT (a plain and a "contrast" copy: new UIDs, a Series
Number, ContrastBolusAgent) and go through the real receive path into a migrated SQLite index, as in
test_series_tracker.py. What a user relies on: a study rule fires once, as soon as every input it names
has a stable series, however the series arrived; until then it says what it waits for; a restart while it
waits loses nothing; a new revision of an input fires again only when the rule asks for it.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import TEST_PLUGINS, wait_for
from helpers.ingest import receive
from helpers.studies import series_uid, study_series
from pydicom import dcmread
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session

from node.config import Config
from node.decide.compile import load_checked_config
from node.decide.explain import explain_series, replay
from node.decide.rules import RulesError, RuleSet, StudySeries
from node.decide.study import evaluate_study
from node.decide.tracker import SeriesTracker
from node.index.db import make_engine, migrate
from node.index.models import Job, Series, Study, StudyTrigger
from node.index.read import study_waiting
from node.index.writer import IndexWriter
from node.plugins.offline import SourceSeries, runs
from node.receive.ingest import Ingest
from node.storage import Storage

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
sys.path.insert(0, str(TEST_PLUGINS))  # study_plugins.py: the local test plugins the config names

CONFIG = """
[node]
data_dir = "{data_dir}"
{database}

[tracker]
stable_after = 0.5
use_expected_counts = false

[plugins.local]
pair = "study_plugins:pair"

[[rules]]
name = "enhancement"
scope = "study"
primary = "ct_contrast"
{extra}
match = {{ Modality = "CT" }}
inputs.ct_plain = {{ ContrastBolusAgent = {{ exists = false }} }}
inputs.ct_contrast = {{ ContrastBolusAgent = {{ exists = true }} }}
actions = [{{ type = "plugin", plugin = "pair" }}]

[[rules]]
name = "whole-study"
scope = "study"
study_quiet = 5
enabled = {whole_study}
match = {{ Modality = "CT" }}
actions = [{{ type = "plugin", plugin = "threshold-seg" }}]
"""


@dataclass
class Node:
    """The receive path and a series tracker on one index; the tracker can be restarted."""

    cfg: Config
    engine: Engine
    storage: Storage
    writer: IndexWriter
    tracker: SeriesTracker | None = None
    ingest: Ingest | None = None
    woken: list[bool] = field(default_factory=list)

    def start(self) -> None:
        self.tracker = SeriesTracker(self.cfg, self.engine, on_jobs=lambda: self.woken.append(True))
        self.tracker.start()
        self.ingest = Ingest(self.storage, self.writer, on_recorded=self.tracker.arrived)

    def stop(self) -> None:
        assert self.tracker is not None
        self.tracker.stop()
        self.tracker = self.ingest = None

    def receive(self, files: list[Path]) -> None:
        assert self.ingest is not None
        for path in files:
            receive(self.storage, self.ingest, path)

    def series_triggered(self, n: int) -> bool:
        with Session(self.engine) as s:
            return len(s.scalars(select(Series).where(Series.state == "triggered")).all()) == n

    def triggers(self) -> list[StudyTrigger]:
        with Session(self.engine) as s:
            rows = list(s.scalars(select(StudyTrigger).order_by(StudyTrigger.id)).all())
            s.expunge_all()
            return rows

    def jobs(self) -> list[Job]:
        with Session(self.engine) as s:
            rows = list(s.scalars(select(Job).order_by(Job.id)).all())
            s.expunge_all()
            return rows

    def series_id(self, files: list[Path]) -> int:
        uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        with Session(self.engine) as s:
            return s.scalars(select(Series.id).where(Series.series_instance_uid == uid)).one()

    def study_uid(self) -> str:
        with Session(self.engine) as s:
            return s.scalars(select(Study.study_instance_uid)).one()

    def waiting(self) -> list[tuple[str, str]]:
        """What the dashboard shows: the waiting texts of the study rules the running config has."""
        assert self.cfg.ruleset is not None
        rules = [r.name for r in self.cfg.ruleset.study_rules if r.model.enabled]
        with self.engine.connect() as conn:
            return study_waiting(conn, self.study_uid(), rules)


@contextmanager
def running(tmp_path: Path, extra: str = "", whole_study: bool = False, url: str = "") -> Iterator[Node]:
    cfg = _config(tmp_path, extra, whole_study, url)
    storage = Storage(cfg.data_dir)
    storage.prepare()
    engine = make_engine(cfg.database_url)
    migrate(engine)
    writer = IndexWriter(engine)
    writer.start()
    node = Node(cfg, engine, storage, writer)
    node.start()
    try:
        yield node
    finally:
        if node.tracker is not None:
            node.stop()
        writer.stop()
        engine.dispose()


def _config(tmp_path: Path, extra: str = "", whole_study: bool = False, url: str = "", name: str = "node") -> Config:
    config = tmp_path / f"{name}.toml"
    database = f'[database]\nurl = "{url}"\n[tracker]' if url else ""
    text = CONFIG.format(data_dir=tmp_path / "data", extra=extra, whole_study=str(whole_study).lower(), database="")
    config.write_text(text.replace("[tracker]", database, 1) if url else text)
    return load_checked_config(config, environ={})


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with running(tmp_path) as n:
        yield n


def test_a_study_rule_fires_once_when_its_inputs_arrived_in_separate_associations(node: Node, tmp_path: Path) -> None:
    plain = study_series(tmp_path / "plain", 2, contrast=False)
    contrast = study_series(tmp_path / "contrast", 3, contrast=True)

    node.receive(plain)
    wait_for(lambda: node.series_triggered(1) and node.waiting(), 10, "the plain series to trigger")
    assert node.triggers() == [] and node.jobs() == []
    assert node.waiting() == [("enhancement", "waiting for ct_contrast")]
    explained = "\n".join(explain_series(node.engine, node.cfg.data_dir, node.cfg.ruleset, series_uid(plain)))
    assert "enhancement" in explained and "waiting for ct_contrast" in explained, explained
    lines, fired = replay(node.engine, node.cfg.data_dir, node.cfg.ruleset, EPOCH)
    assert f"study {node.study_uid()}: enhancement waiting for ct_contrast" in lines and not fired["enhancement"]

    node.receive(contrast)
    wait_for(lambda: node.triggers(), 10, "the study rule to fire")
    wait_for(lambda: node.woken, 5, "the job runner to be told")

    [trigger] = node.triggers()
    assert (trigger.rule, trigger.revision) == ("enhancement", 1)
    inputs = json.loads(trigger.inputs)
    assert inputs["primary"] == "ct_contrast"
    assert {k: v["series_id"] for k, v in inputs["inputs"].items()} == {
        "ct_plain": node.series_id(plain),
        "ct_contrast": node.series_id(contrast),
    }
    [job] = node.jobs()
    assert (job.rule, job.kind, job.series_fk, job.study_trigger_fk) == (
        "enhancement",
        "plugin",
        node.series_id(contrast),  # the primary input
        trigger.id,
    )
    assert node.waiting() == []
    # Replay (what the rules would do now with what is stored) shows the study rule with its inputs.
    lines, fired = replay(node.engine, node.cfg.data_dir, node.cfg.ruleset, EPOCH)
    assert fired["enhancement"] == 1
    assert (
        f"study {node.study_uid()}: enhancement (ct_plain={series_uid(plain)}, ct_contrast={series_uid(contrast)}; "
        "primary ct_contrast) -> run pair"
    ) in lines, lines

    # Evaluated again (as a restart or another process would): the same inputs never fire twice.
    assert node.tracker is not None
    again = evaluate_study(node.engine, node.engine, node.cfg.data_dir, node.cfg.ruleset, trigger.study_fk)
    assert again.fired == [] and [r.status for r in again.results] == ["ready", "disabled"]
    assert len(node.triggers()) == 1 and len(node.jobs()) == 1


def test_a_restart_while_a_study_rule_waits_then_the_input_arrives_fires_once(node: Node, tmp_path: Path) -> None:
    plain = study_series(tmp_path / "plain", 2, contrast=False)
    contrast = study_series(tmp_path / "contrast", 3, contrast=True)
    node.receive(plain)
    wait_for(lambda: node.series_triggered(1) and node.waiting(), 10, "the plain series to trigger")

    node.stop()
    node.start()  # a new tracker on the same index: nothing was kept in memory
    node.receive(contrast)

    wait_for(lambda: node.triggers(), 10, "the study rule to fire after the restart")
    node.stop()
    node.start()  # and a restart after firing fires nothing more
    wait_for(lambda: node.series_triggered(2), 5, "both series triggered")
    assert len(node.triggers()) == 1 and len(node.jobs()) == 1


@pytest.mark.parametrize(("on_revision", "fired"), [("ignore", 1), ("rerun", 2)])
def test_a_new_revision_of_an_input_fires_again_only_with_on_revision_rerun(
    tmp_path: Path, on_revision: str, fired: int
) -> None:
    with running(tmp_path, extra=f'on_revision = "{on_revision}"') as node:
        plain = study_series(tmp_path / "plain", 2, contrast=False)
        contrast = study_series(tmp_path / "contrast", 3, contrast=True, count=4)
        node.receive(plain + contrast[:3])
        wait_for(lambda: node.triggers(), 10, "the study rule to fire")
        node.receive(contrast[3:])  # revision 2 of the contrast series
        wait_for(lambda: node.series_triggered(2) and _revision(node, contrast) == 2, 10, "revision 2")
        wait_for(lambda: len(node.triggers()) == fired, 10, f"{fired} firing(s)")
        if fired == 1:  # nothing more comes: the study was evaluated after revision 2 triggered
            wait_for(lambda: _evaluated(node), 10, "the study to be evaluated after revision 2")
        triggers = node.triggers()
        assert [t.revision for t in triggers] == list(range(1, fired + 1))
        assert [j.revision for j in node.jobs()] == list(range(1, fired + 1))
        if fired == 2:
            assert json.loads(triggers[1].inputs)["inputs"]["ct_contrast"]["revision"] == 2


def _evaluated(node: Node) -> bool:
    with Session(node.engine) as s:
        return s.scalars(select(Study.study_rules_due)).one() is None


def _revision(node: Node, files: list[Path]) -> int:
    with Session(node.engine) as s:
        return int(s.scalars(select(Series.revision).where(Series.id == node.series_id(files))).one())


def test_a_study_rule_without_inputs_fires_once_the_study_is_quiet(tmp_path: Path) -> None:
    with running(tmp_path, extra="enabled = false", whole_study=True) as node:
        first = study_series(tmp_path / "a", 7, contrast=False)
        second = study_series(tmp_path / "b", 4, contrast=True)
        node.receive(first)
        wait_for(lambda: node.series_triggered(1), 10, "the first series to trigger")
        node.receive(second)  # within the study's quiet period: one firing for both
        wait_for(lambda: node.triggers(), 30, "the study rule to fire")
        [trigger] = node.triggers()
        inputs = json.loads(trigger.inputs)
        # Every series, keyed by Series Number in number order; the first is the primary.
        assert list(inputs["inputs"]) == ["series-4", "series-7"] and inputs["primary"] == "series-4"
        assert trigger.reason == "no instance in the study for 5 s"
        [job] = node.jobs()
        assert job.series_fk == node.series_id(second)


@pytest.mark.parametrize(
    ("table", "error"),
    [
        (
            {"name": "r", "inputs": {"a": {"Modality": "CT"}}, "actions": [{"type": "plugin", "plugin": "p"}]},
            'rules[0] ("r").inputs: only a study rule has inputs; add scope = "study"',
        ),
        (
            {"name": "r", "scope": "study", "inputs": {"a": {}}, "actions": [{"type": "forward", "to": ["pacs"]}]},
            'rules[0] ("r").actions[0].type: a study rule runs plugins',
        ),
        (
            {
                "name": "r",
                "scope": "study",
                "primary": "b",
                "inputs": {"a": {}},
                "actions": [{"type": "plugin", "plugin": "p"}],
            },
            "rules[0] (\"r\").primary: no input named 'b' (inputs: a)",
        ),
        (
            {"name": "r", "scope": "study", "stop": True, "actions": [{"type": "plugin", "plugin": "p"}]},
            'rules[0] ("r").stop: not for a study rule',
        ),
        (
            {
                "name": "r",
                "scope": "study",
                "inputs": {"a": {"Modality": {"regex": "("}}},
                "actions": [{"type": "plugin", "plugin": "p"}],
            },
            'rules[0] ("r").inputs.a.Modality',
        ),
        (
            {"name": "r", "scope": "study", "study_quiet": "2 weeks", "actions": [{"type": "plugin", "plugin": "p"}]},
            'rules[0] ("r").study_quiet',
        ),
        (
            {"name": "r", "actions": [{"type": "plugin", "plugin": "study-plugin"}]},
            'rules[0] ("r").actions[0].plugin: plugin \'study-plugin\' takes a study (takes = "study"): '
            'its rule needs scope = "study"',
        ),
    ],
)
def test_study_rule_mistakes_are_errors_naming_the_key(table: dict, error: str) -> None:
    with pytest.raises(RulesError) as e:
        RuleSet.compile(
            [table],
            destinations=["pacs"],
            plugins=["p", "study-plugin"],
            takes=lambda name: "study" if name == "study-plugin" else "series",
        )
    assert any(line.startswith(error) for line in e.value.errors), e.value.errors


def test_study_quiet_takes_a_duration() -> None:
    rules = RuleSet.compile(
        [{"name": "r", "scope": "study", "study_quiet": "2m", "actions": [{"type": "plugin", "plugin": "p"}]}],
        plugins=["p"],
    )
    [rule] = rules.study_rules
    assert rule.model.study_quiet == 120 and rules.series_rules == []


def test_two_processes_evaluating_a_ready_study_at_once_fire_it_once(tmp_path: Path, any_index_url: str) -> None:
    """Each evaluation claims the firing in its own transaction: the study_trigger row's insert decides."""
    with running(tmp_path, extra="enabled = false", url=any_index_url) as node:  # stored, not fired
        node.receive(study_series(tmp_path / "plain", 2, contrast=False))
        node.receive(study_series(tmp_path / "contrast", 3, contrast=True))
        wait_for(lambda: node.series_triggered(2) and _evaluated(node), 10, "both series to trigger")
        study_id = _study_id(node)
    ruleset = _config(tmp_path, url=any_index_url, name="enabled").ruleset
    assert ruleset is not None
    barrier = threading.Barrier(2)

    def process() -> list[tuple[str, int, list[int]]]:
        engine = make_engine(any_index_url)  # a connection pool of its own, as another process has
        try:
            barrier.wait(10)
            return evaluate_study(engine, engine, node.cfg.data_dir, ruleset, study_id).fired
        finally:
            engine.dispose()

    with ThreadPoolExecutor(2) as pool:
        fired = [f for f in pool.map(lambda _: process(), range(2))]
    assert sorted(len(f) for f in fired) == [0, 1], fired
    engine = make_engine(any_index_url)
    try:
        with Session(engine) as s:
            assert len(s.scalars(select(StudyTrigger)).all()) == 1
            assert len(s.scalars(select(Job)).all()) == 1
    finally:
        engine.dispose()


def _study_id(node: Node) -> int:
    with Session(node.engine) as s:
        return int(s.scalars(select(Study.id)).one())


def test_rules_check_says_what_a_study_rule_waits_for() -> None:
    rules = RuleSet.compile(
        [
            {
                "name": "r",
                "scope": "study",
                "primary": "post",
                "match": {"Modality": "CT"},
                "inputs": {
                    "pre": {"ContrastBolusAgent": {"exists": False}},
                    "post": {"ContrastBolusAgent": {"exists": True}},
                },
                "actions": [{"type": "plugin", "plugin": "p"}],
            }
        ],
        plugins=["p"],
    )
    assert rules.study_rules[0].describe() == [
        'for each study, of its series where Modality = "CT":',
        "input pre: ContrastBolusAgent is missing",
        "input post (primary): ContrastBolusAgent is present",
        "when each input has a stable series",
    ]


def test_a_study_whose_process_died_before_evaluating_it_is_taken_up_by_another_sweep(
    node: Node, tmp_path: Path
) -> None:
    """Process A triggers the series (so the study is due) but dies before its study timer fires."""
    other = SeriesTracker(node.cfg, node.engine, lease=0.5)  # process B, sharing the index
    other.start()
    try:
        assert node.tracker is not None
        node.tracker._schedule_study = lambda *args, **kwargs: None  # type: ignore[method-assign]  # A's timer never fires
        node.receive(study_series(tmp_path / "plain", 2, contrast=False))
        node.receive(study_series(tmp_path / "contrast", 3, contrast=True))
        wait_for(lambda: node.series_triggered(2), 10, "both series to trigger")
        assert node.triggers() == [] and not _evaluated(node)  # due, and nobody evaluates it

        def swept() -> bool:
            other.sweep()  # B's heartbeat: a study due for longer than the lease is evaluated there
            return bool(node.triggers())

        wait_for(swept, 10, "the other process's sweep to fire the study rule", interval=0.3)
    finally:
        other.stop()
    assert len(node.triggers()) == 1 and len(node.jobs()) == 1


def _ruleset(inputs: Mapping[str, Mapping[str, object]], on_revision: str = "ignore") -> RuleSet:
    return RuleSet.compile(
        [
            {
                "name": "enhancement",
                "scope": "study",
                "on_revision": on_revision,
                "match": {"Modality": "CT"},
                "inputs": inputs,
                "actions": [{"type": "plugin", "plugin": "pair"}],
            }
        ],
        plugins=["pair"],
    )


def _series(series_id: int, minute: int, *, contrast: bool, number: int | None = None) -> StudySeries:
    facts = {"Modality": "CT", "SeriesNumber": number, **({"ContrastBolusAgent": "IODINE"} if contrast else {})}
    when = EPOCH + dt.timedelta(minutes=minute)
    return StudySeries(series_id, f"1.2.3.{series_id}", number, 1, True, when, facts)


def test_overlapping_input_conditions_still_give_each_input_a_series() -> None:
    """ct_plain = any CT also fits the contrast series: taking the newest CT for it first would leave
    ct_contrast nothing, and the rule would wait forever although the study has what it needs."""
    rules = _ruleset({"ct_plain": {"Modality": "CT"}, "ct_contrast": {"ContrastBolusAgent": {"exists": True}}})
    plain, newer_plain, contrast = (
        _series(1, 0, contrast=False),
        _series(2, 5, contrast=False),
        _series(3, 9, contrast=True),
    )

    [result] = rules.evaluate_study([plain, contrast], EPOCH)
    assert result.status == "ready", result.why
    assert {k: s.series_id for k, s in result.inputs.items()} == {"ct_plain": 1, "ct_contrast": 3}

    [result] = rules.evaluate_study([plain, newer_plain, contrast], EPOCH)  # among what works: the newest
    assert {k: s.series_id for k, s in result.inputs.items()} == {"ct_plain": 2, "ct_contrast": 3}

    [result] = rules.evaluate_study([contrast], EPOCH)  # one series cannot be both inputs
    assert (result.status, result.missing) == ("waiting", ("ct_contrast",))
    assert result.why.startswith("waiting for ct_contrast (ct_contrast: the series that fit it fit other inputs too")


def test_a_study_run_offline_names_its_inputs_as_a_study_rule_does() -> None:
    """``plugins run --study`` and a study rule without inputs key a study's series the same way."""
    numbers = [7, 4, None, 9, 9]
    rules = RuleSet.compile(
        [{"name": "all", "scope": "study", "study_quiet": 1, "actions": [{"type": "plugin", "plugin": "p"}]}],
        plugins=["p"],
    )
    [result] = rules.evaluate_study(
        [_series(i, 0, contrast=False, number=n) for i, n in enumerate(numbers, 1)], EPOCH + dt.timedelta(hours=1)
    )
    source = [SourceSeries(f"1.2.3.{i}", [], "CT", "" if n is None else str(n), "") for i, n in enumerate(numbers, 1)]
    [run] = runs(source, study=True)
    assert list(result.inputs) == list(run.inputs) == ["series-4", "series-7", "1.2.3.4", "1.2.3.5", "1.2.3.3"]


def test_a_study_rule_removed_or_disabled_since_it_waited_waits_for_nothing(node: Node, tmp_path: Path) -> None:
    node.receive(study_series(tmp_path / "plain", 2, contrast=False))
    wait_for(lambda: node.series_triggered(1) and node.waiting(), 10, "the plain series to trigger")
    assert node.waiting() == [("enhancement", "waiting for ct_contrast")]

    node.stop()  # restarted with the rule disabled: nothing evaluates the study again
    node.cfg = _config(tmp_path, extra="enabled = false", name="disabled")
    node.start()
    assert node.waiting() == []
    with node.engine.connect() as conn:  # and with the rule gone from the config
        assert study_waiting(conn, node.study_uid(), ["whole-study"]) == []


def test_two_processes_firing_different_input_sets_at_once_lose_neither(tmp_path: Path, any_index_url: str) -> None:
    """Process A sees contrast series 3 as the newest, B already series 4 (here: their rules pick by number).
    Both read the study's firings before either inserts; B must not lose its firing to A's revision."""
    with running(tmp_path, extra="enabled = false", url=any_index_url) as node:  # stored, not fired
        node.receive(study_series(tmp_path / "plain", 2, contrast=False))
        node.receive(study_series(tmp_path / "contrast3", 3, contrast=True))
        node.receive(study_series(tmp_path / "contrast4", 4, contrast=True))
        wait_for(lambda: node.series_triggered(3) and _evaluated(node), 15, "the three series to trigger")
        study_id = _study_id(node)
    rulesets = [
        _ruleset(
            {"ct_plain": {"ContrastBolusAgent": {"exists": False}}, "ct_contrast": {"SeriesNumber": number}},
            on_revision="rerun",
        )
        for number in (3, 4)
    ]
    barrier = threading.Barrier(2)
    waited = threading.local()

    def process(ruleset: RuleSet) -> list[tuple[str, int, list[int]]]:
        engine = make_engine(any_index_url)  # a connection pool of its own, as another process has

        @event.listens_for(engine, "before_cursor_execute")
        def meet(conn: object, cursor: object, statement: str, *args: object) -> None:
            if statement.startswith("INSERT INTO study_trigger") and not getattr(waited, "done", False):
                waited.done = True
                try:  # both insert at once, unless one waits for the other's study row lock
                    barrier.wait(2)
                except threading.BrokenBarrierError:
                    pass

        try:
            return evaluate_study(engine, engine, node.cfg.data_dir, ruleset, study_id).fired
        finally:
            engine.dispose()

    with ThreadPoolExecutor(2) as pool:
        fired = list(pool.map(process, rulesets))
    assert sorted(len(f) for f in fired) == [1, 1], fired
    engine = make_engine(any_index_url)
    try:
        with Session(engine) as s:
            triggers = s.scalars(select(StudyTrigger).order_by(StudyTrigger.revision)).all()
            assert [t.revision for t in triggers] == [1, 2]
            numbers = sorted(json.loads(t.inputs)["inputs"]["ct_contrast"]["series_id"] for t in triggers)
            assert len(set(numbers)) == 2
            assert sorted(j.study_trigger_fk for j in s.scalars(select(Job)).all()) == sorted(t.id for t in triggers)
    finally:
        engine.dispose()
