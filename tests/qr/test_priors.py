"""Priors configuration and waiting (node.qr.priors, node.jobs.store.defer), without a PACS.

What an administrator sees when a [[sources]] table or a rule's ``priors`` is wrong (the key to change),
when the back-off tries a source that is down again, and that a deferred job keeps its attempts.
The retrieval itself against a real PACS is tests/e2e/priors.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from node.config import ConfigError, load_config
from node.decide.compile import compile_rules
from node.index.cluster import Membership
from node.index.db import make_engine, migrate
from node.index.models import Job, Patient, Series, Study
from node.jobs import store
from node.jobs.spec import PluginAction
from node.jobs.store import NewJob, create_jobs
from node.qr.priors import next_try

SOURCE = """
[[sources]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.5"
port = 104
"""

RULE = """
[[rules]]
name = "follow-up"
match = {{ Modality = "CT" }}
[[rules.actions]]
type = "plugin"
plugin = "threshold-seg"
priors = {{ from = "{source}", modality = "CT" }}
"""


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return load_config(path, environ={})


@pytest.mark.parametrize(
    ("table", "key", "says"),
    [
        ('name = "pacs"\nae_title = "PACS"\nhost = "h"', "sources[0].port", "Field required"),
        ('name = "pacs"\nae_title = "A_VERY_LONG_AE_TITLE"\nhost = "h"\nport = 104', "sources[0].ae_title", "16"),
        ('name = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\nretrieve = "fetch"', "sources[0].retrieve", "move"),
        ('name = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\nprot = 1', "sources[0].prot", "unknown key"),
    ],
)
def test_a_bad_sources_table_names_its_key(tmp_path: Path, table: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"[[sources]]\n{table}\n")
    line = next(x for x in str(e.value).splitlines() if key in x)
    assert says in line, str(e.value)


def test_a_source_name_used_twice_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="source name 'pacs' is used twice"):
        _load(tmp_path, SOURCE + SOURCE)


def test_a_rule_asking_an_unknown_source_names_the_action_and_the_sources(tmp_path: Path) -> None:
    cfg = _load(tmp_path, SOURCE + RULE.format(source="archive"))
    with pytest.raises(ConfigError) as e:
        compile_rules(cfg)  # type: ignore[arg-type]
    assert "rules[0] (\"follow-up\").actions[0].priors.from: unknown source 'archive' (sources: pacs)" in str(e.value)
    compile_rules(_load(tmp_path, SOURCE + RULE.format(source="pacs")))  # type: ignore[arg-type]


def test_priors_keys_are_checked_and_a_timeout_may_be_written_with_a_unit() -> None:
    def action(**priors: object) -> PluginAction:
        return PluginAction.model_validate({"type": "plugin", "plugin": "p", "priors": priors})

    assert action(**{"from": "pacs", "timeout": "2h"}).priors.timeout == 7200  # type: ignore[union-attr]
    assert action(**{"from": "pacs", "timeout": 90}).priors.timeout == 90  # type: ignore[union-attr]
    for bad, says in [
        ({"from": "pacs", "same": ["PatientName"]}, 'must include "PatientID"'),
        ({"from": "pacs", "timeout": "an hour"}, "is not a duration"),
        ({"from": "pacs", "max": 0}, "greater than or equal to 1"),
        ({"same": ["PatientID"]}, "from"),
    ]:
        with pytest.raises(ValidationError, match=says):
            action(**bad)
    # Stored with the job and read back the same (the runner validates the job's JSON again).
    a = action(**{"from": "pacs", "modality": "CT", "max": 1})
    assert PluginAction.model_validate(a.model_dump(mode="json")) == a


def test_the_back_off_doubles_within_its_bounds_and_ends_at_the_timeout() -> None:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    tries, now = [], t0
    while (at := next_try(t0, now, timeout=300, retry_delay=10, max_retry_delay=60)) is not None:
        tries.append((at - t0).total_seconds())
        now = at
    # 10 s at least, then as long as it waited (doubling), at most 60 s, the last try at the deadline.
    assert tries == [10, 20, 40, 80, 140, 200, 260, 300]
    assert next_try(t0, t0 + dt.timedelta(seconds=300), 300, 10, 60) is None


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    migrate(e)
    with Session(e) as s:
        s.add(
            Series(
                series_instance_uid="1.2.3.1",
                state="triggered",
                study=Study(study_instance_uid="1.2.3", patient=Patient()),
            )
        )
        s.commit()
    yield e
    e.dispose()


def test_a_deferred_job_is_pending_at_its_next_try_and_spent_no_attempt(engine: Engine, tmp_path: Path) -> None:
    owner = Membership(engine, tmp_path / "run", lease=30)
    owner.register()
    with engine.begin() as conn:
        [job_id] = create_jobs(conn, 1, 1, [NewJob("follow-up", 0, "plugin", {"type": "plugin", "plugin": "p"})])
    claimed = store.claim_next(engine, owner.id)
    assert claimed is not None and claimed.attempts == 1
    until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    done = store.defer(engine, job_id, owner.id, note="waiting for priors: no connection", until=until)
    assert done.recorded
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempts, job.owner, job.last_error) == (
            "pending",
            0,
            None,
            "waiting for priors: no connection",
        )
    assert store.claim_next(engine, owner.id) is None  # not before its next try
    # A job no longer this process's (cancelled meanwhile) is left as it is.
    claimed = store.claim_next(engine, owner.id, now=until)
    assert claimed is not None
    store.cancel(engine, job_id)
    assert not store.defer(engine, job_id, owner.id, note="late", until=until).recorded
    with Session(engine) as s:
        assert s.get(Job, job_id).state == "cancelled"  # type: ignore[union-attr]


def test_priors_for_a_plugin_outside_the_nodes_python_are_refused_with_the_reason(tmp_path: Path) -> None:
    """A command (or a plugin environment's worker) would not get the priors: the rule is refused, not silently run."""
    command = '[plugins.commands.tool]\ncommand = ["/bin/true", "{input}", "{output}"]\n'
    rule = RULE.format(source="pacs").replace('plugin = "threshold-seg"', 'plugin = "tool"')
    with pytest.raises(ConfigError) as e:
        compile_rules(_load(tmp_path, SOURCE + command + rule))  # type: ignore[arg-type]
    assert (
        "rules[0] (\"follow-up\").actions[0].priors: plugin 'tool' runs as a command; priors reach only plugins "
        "that run in the node's own Python" in str(e.value)
    )


def test_a_study_without_patient_id_runs_without_priors_unless_they_are_required(engine: Engine) -> None:
    """Nothing identifies the patient to the PACS: no query is made (it would match other patients)."""
    from node.config import Config
    from node.qr.priors import PriorsFailed, fetch_priors

    cfg = Config.model_validate({"sources": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}]})
    optional = PluginAction.model_validate({"type": "plugin", "plugin": "p", "priors": {"from": "pacs"}}).priors
    assert fetch_priors(cfg, engine, 1, 1, optional) == []
    required = optional.model_copy(update={"optional": False})  # type: ignore[union-attr]
    with pytest.raises(PriorsFailed, match="no Patient ID"):
        fetch_priors(cfg, engine, 1, 1, required)
