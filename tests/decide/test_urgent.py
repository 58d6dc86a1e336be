"""Urgent priority: a rule or an action with ``priority = "urgent"`` makes jobs that are claimed before every normal
job; how it reads in the config, its errors, ``rules check``, the job store, and a real node forwarding a CT."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from node.config import ConfigError
from node.decide.compile import load_checked_config
from node.decide.explain import rule_lines
from node.decide.rules import PRIORITY_LIMIT, URGENT, RuleSet
from node.index.db import make_engine, migrate
from node.index.models import Patient, Series, Study
from node.jobs.store import NewJob, claim_next, create_jobs

CT = "ct-head-philips-5mm"

HEADER = """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[plugins]
local = { seg = "node.plugins.builtin.threshold:threshold_seg" }
"""

#: Three rules that all match a CT: a routine one with a high number, one with an urgent action, an urgent rule.
RULES = """
[[rules]]
name = "routine"
priority = 50
match = { Modality = "CT" }
actions = [{ type = "forward", to = ["pacs"] }]

[[rules]]
name = "stroke"
match = { Modality = "CT" }
actions = [{ type = "forward", to = ["pacs"] },
           { type = "plugin", plugin = "seg", priority = "urgent", gpu = "optional", send_to = ["pacs"] }]

[[rules]]
name = "trauma"
priority = "urgent"
match = { Modality = "CT" }
actions = [{ type = "forward", to = ["pacs"] }]
"""


def load(tmp_path: Path, rules: str, header: str = HEADER):  # type: ignore[no-untyped-def]
    path = tmp_path / "node.toml"
    path.write_text(header + rules)
    return load_checked_config(path, environ={})


def errors_of(tmp_path: Path, rules: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, rules)
    return str(e.value).splitlines()[1:]


def test_urgent_rule_and_action_parse_and_order_before_every_number(tmp_path):
    rs = load(tmp_path, RULES).ruleset
    assert [r.name for r in rs] == ["trauma", "routine", "stroke"]
    trauma, routine, stroke = rs.get("trauma").model, rs.get("routine").model, rs.get("stroke").model
    assert trauma.priority == "urgent" and trauma.urgent
    plugin = stroke.actions[1]
    assert plugin.priority == "urgent" and plugin.gpu == "optional" and stroke.actions[0].priority == "normal"
    assert rs.get("routine").model.actions[0].model_dump(mode="json")["priority"] == "normal"
    # The jobs' priorities: urgent above every normal one, the rules' numbers still ordering each group.
    assert [routine.job_priority(a) for a in routine.actions] == [50]
    assert [stroke.job_priority(a) for a in stroke.actions] == [0, URGENT]
    assert [trauma.job_priority(a) for a in trauma.actions] == [URGENT + PRIORITY_LIMIT + 1]
    lowest_urgent = load(
        tmp_path,
        RULES.replace('[[rules]]\nname = "stroke"', f'[[rules]]\nname = "stroke"\npriority = -{PRIORITY_LIMIT}'),
    )
    stroke_low = lowest_urgent.ruleset.get("stroke").model
    assert stroke_low.job_priority(stroke_low.actions[1]) > PRIORITY_LIMIT  # above the highest normal job


def test_urgent_reads_as_such_where_rules_are_explained(tmp_path):
    rs = load(tmp_path, RULES).ruleset
    lines = list(rule_lines(rs.evaluate({"Modality": "CT", "revision": 1})))
    assert lines == [
        "  1. trauma (priority urgent): MATCHED -> forward the series to pacs",
        "  2. routine (priority 50): MATCHED -> forward the series to pacs",
        "  3. stroke (priority 0): MATCHED -> forward the series to pacs; run seg, send results to pacs, gpu optional "
        "(urgent)",
    ]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "priority = 50",
            'priority = "high"',
            'rules[0] ("routine").priority: give a whole number from -99999 to 99999 (higher first) or "urgent" '
            "(got 'high')",
        ),
        (
            "priority = 50",
            "priority = 100000",
            'rules[0] ("routine").priority: give a whole number from -99999 to 99999 (higher first) or "urgent" '
            "(got 100000)",
        ),
        (
            'actions = [{ type = "forward", to = ["pacs"] }]',
            'actions = [{ type = "forward", to = ["pacs"], priority = "soon" }]',
            "rules[0] (\"routine\").actions[0].priority: Input should be 'normal' or 'urgent' (got 'soon')",
        ),
        (
            'gpu = "optional"',
            'gpu = "always"',
            "rules[1] (\"stroke\").actions[1].gpu: Input should be 'none', 'optional' or 'required' (got 'always')",
        ),
    ],
    ids=["rule-word", "rule-too-high", "action-word", "action-gpu"],
)
def test_a_wrong_priority_or_gpu_names_the_key(tmp_path, old, new, expected):
    rules = RULES.replace(old, new, 1)
    assert rules != RULES
    assert errors_of(tmp_path, rules) == [f"  {expected}"]


def test_urgent_jobs_are_claimed_before_normal_ones_that_came_earlier(tmp_path):
    """The real job store (SQLite, migrated): routine jobs of an older series wait for a later series' urgent ones."""
    rs: RuleSet = load(tmp_path, RULES).ruleset
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    migrate(engine)
    try:
        with Session(engine) as s:
            study = Study(study_instance_uid="1.2.3", patient=Patient())
            s.add_all([Series(series_instance_uid=f"1.2.3.{n}", state="triggered", study=study) for n in (1, 2)])
            s.commit()
        routine = rs.get("routine").model
        with engine.begin() as conn:  # series 1 first: only its routine job
            create_jobs(conn, 1, 1, [NewJob("routine", 0, "forward", {}, routine.job_priority(routine.actions[0]))])
        with engine.begin() as conn:  # then series 2: every rule's jobs, made as the tracker makes them
            jobs = [
                NewJob(r.name, i, a.type, a.model_dump(mode="json"), r.model.job_priority(a))
                for r in rs
                for i, a in enumerate(r.model.actions)
            ]
            create_jobs(conn, 2, 1, jobs)
        claimed = []
        while (job := claim_next(engine, "test")) is not None:
            claimed.append((job.series_id, job.rule, job.action_index))
        assert claimed == [(2, "trauma", 0), (2, "stroke", 1), (1, "routine", 0), (2, "routine", 0), (2, "stroke", 0)]
    finally:
        engine.dispose()
