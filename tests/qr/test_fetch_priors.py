"""fetch_priors' own path (node.qr.priors) on a real index, with the source's C-FIND and C-MOVE stood in for.

The stand-in C-MOVE "delivers" by storing the study's real files through the node's C-STORE write path, as
the acceptor would; the index, the prior_fetch rows, the job row and the retrieve pool are the real ones.
What the network side does against a real PACS is tests/e2e/priors; a slow real source is
test_priors_slow_source.py.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import series_files, variants
from helpers.ingest import receive
from pydicom import Dataset
from sqlalchemy import Engine, select, update

from node.config import Config
from node.index.cluster import Membership
from node.index.db import make_engine, migrate
from node.index.models import AuditEvent, Job, PriorFetch, Series, utcnow
from node.index.writer import IndexWriter
from node.jobs.spec import PluginAction, PriorsRequest
from node.jobs.store import NewJob, create_jobs
from node.qr import priors
from node.qr.priors import FoundStudy, Moved, PriorsFailed, PriorsWaiting, Retrieves, SourceError, fetch_priors
from node.receive.ingest import Ingest
from node.storage import Storage

CT, MR = "ct-head-philips-5mm", "mr-t1-sag-siemens"


@dataclass
class Node:
    """A data folder and index holding the new CT series (the job's), and a job on it asking for priors."""

    engine: Engine
    storage: Storage
    ingest: Ingest
    process: Membership
    job_id: int
    series_id: int
    cfg: Config = field(
        default_factory=lambda: Config.model_validate(
            {"sources": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9, "retry_delay": 10}]}
        )
    )

    def receive(self, files: list[Path]) -> None:
        for f in files:
            receive(self.storage, self.ingest, f)

    def fetches(self) -> dict[str, tuple[str, int, str]]:
        """{study: (state, received, error)} of the job's prior_fetch rows."""
        pf = PriorFetch.__table__
        with self.engine.connect() as conn:
            rows = conn.execute(select(pf.c.study_uid, pf.c.state, pf.c.received, pf.c.error)).all()
        return {r.study_uid: (r.state, r.received, r.error) for r in rows}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    migrate(engine)
    process = Membership(engine, tmp_path / "data" / "run", lease=60)
    process.register()
    storage = Storage(tmp_path / "data", process.id)
    storage.prepare()
    writer = IndexWriter(engine)
    writer.start()
    ingest = Ingest(storage, writer, duplicates="keep_first")
    for f in series_files(CT)[:3]:
        receive(storage, ingest, f)
    with engine.begin() as conn:
        series_id = conn.execute(select(Series.id)).scalar_one()
        [job_id] = create_jobs(
            conn, series_id, 1, [NewJob("follow-up", 0, "plugin", {"type": "plugin", "plugin": "p"})]
        )
    yield Node(engine, storage, ingest, process, job_id, series_id)
    writer.stop()
    engine.dispose()


@dataclass
class Study:
    found: FoundStudy
    files: list[Path]


def _study(files: list[Path], *, instances: int | None = None) -> Study:
    from pydicom import dcmread

    ds = dcmread(files[0], stop_before_pixels=True)
    n = len(files) if instances is None else instances
    return Study(
        FoundStudy(str(ds.StudyInstanceUID), str(ds.StudyDate), modalities=str(ds.Modality), instances=n), files
    )


@pytest.fixture
def mr(tmp_path: Path) -> Study:
    """A real MR study (5 of its images) as the source holds it."""
    return _study(series_files(MR)[:5])


@pytest.fixture
def older(tmp_path: Path) -> Study:
    """A second, older study of the patient (4 real CT images under new UIDs, dated 2010)."""
    dsets = variants.make("ct-head")[:4]
    for d in dsets:
        d.StudyDate = "20100101"
    return _study(variants.write(dsets, tmp_path / "older"))


@dataclass
class Source:
    """What the stand-in source answers: its studies, the moves asked for, the studies whose move fails."""

    node: Node
    studies: list[Study]
    moves: list[str] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)
    find_error: str = ""
    #: Called at the start of each move (e.g. to look at the index, or to hold the move).
    on_move: Callable[[str], None] = lambda uid: None

    def find(self, src: object, calling: str, keys: dict[str, str], dates: str, modality: str) -> list[FoundStudy]:
        if self.find_error:
            raise SourceError(self.find_error)
        return [s.found for s in self.studies]

    def move(self, src: object, calling: str, study_uid: str) -> Moved:
        self.moves.append(study_uid)
        self.on_move(study_uid)
        if study_uid in self.failing:
            raise SourceError(f"source 'pacs': the C-MOVE of study {study_uid} ended with status 0xA702")
        files = next(s.files for s in self.studies if s.found.study_uid == study_uid)
        self.node.receive(files)
        return Moved(len(files), 0, 0)


def _source(node: Node, monkeypatch: pytest.MonkeyPatch, *studies: Study) -> Source:
    source = Source(node, list(studies))
    monkeypatch.setattr(priors, "find_studies", source.find)
    monkeypatch.setattr(priors, "move_study", source.move)
    return source


def _request(**keys: object) -> PriorsRequest:
    request = PluginAction.model_validate({"type": "plugin", "plugin": "p", "priors": {"from": "pacs", **keys}}).priors
    assert request is not None
    return request


def _fetch(node: Node, request: PriorsRequest, **kw: object) -> list[priors.Prior]:
    return fetch_priors(node.cfg, node.engine, node.job_id, node.series_id, request, **kw)  # type: ignore[arg-type]


def test_a_study_received_normally_is_used_as_held_and_never_becomes_a_prior(
    node: Node, mr: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer instances held than the PACS reports: still the study it was (its rules, its retention)."""
    node.receive(mr.files[:3])
    source = _source(node, monkeypatch, _study(mr.files, instances=len(mr.files)))
    [prior] = _fetch(node, _request())
    assert source.moves == []  # not retrieved
    assert node.fetches() == {}  # and no row makes it a prior
    assert not priors.is_prior_study(node.engine, mr.found.study_uid)
    assert prior.study_uid == mr.found.study_uid
    assert [len(s) for s in prior.series] == [3]  # what is held is handed over


def test_a_prior_is_recorded_before_its_retrieve_and_handed_over_once_held(
    node: Node, mr: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(node, monkeypatch, mr)
    at_move: list[dict[str, tuple[str, int, str]]] = []
    source.on_move = lambda uid: at_move.append(node.fetches())
    [prior] = _fetch(node, _request())
    # The row was there, saying "retrieving", before the first instance could arrive.
    assert at_move == [{mr.found.study_uid: ("retrieving", 0, "")}]
    assert node.fetches() == {mr.found.study_uid: ("retrieved", len(mr.files), "")}
    assert priors.is_prior_study(node.engine, mr.found.study_uid)
    assert (prior.study_uid, [len(s) for s in prior.series]) == (mr.found.study_uid, [len(mr.files)])
    with node.engine.connect() as conn:
        audited = conn.execute(select(AuditEvent.detail).where(AuditEvent.kind == "prior_retrieved")).scalars().all()
    assert audited == [f"from source 'pacs' by C-MOVE: {len(mr.files)} sent, {len(mr.files)} held now"]
    # Asked again (another run of the job): held, nothing retrieved twice.
    assert [p.study_uid for p in _fetch(node, _request())] == [mr.found.study_uid]
    assert source.moves == [mr.found.study_uid]


def test_a_retrieve_failing_halfway_keeps_the_first_study_and_fails_the_rest_after_the_timeout(
    node: Node, mr: Study, older: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(node, monkeypatch, older, mr)
    source.failing = {older.found.study_uid}
    t0 = utcnow()
    with pytest.raises(PriorsWaiting, match="0xA702"):
        _fetch(node, _request(timeout=60), now=lambda: t0)
    assert source.moves == [mr.found.study_uid, older.found.study_uid]  # newest first
    rows = node.fetches()
    assert rows[mr.found.study_uid] == ("retrieved", len(mr.files), "")
    assert rows[older.found.study_uid][0] == "requested" and "0xA702" in rows[older.found.study_uid][2]
    # Past the timeout the job fails with the reason; the retrieved study stays, the other is failed.
    with pytest.raises(PriorsFailed, match="0xA702.*priors.timeout = 60 s"):
        _fetch(node, _request(timeout=60), now=lambda: t0 + dt.timedelta(seconds=61))
    assert source.moves[1:] == [older.found.study_uid, older.found.study_uid]  # the first study not again
    rows = node.fetches()
    assert rows[mr.found.study_uid][0] == "retrieved" and rows[older.found.study_uid][0] == "failed"
    assert priors.is_prior_study(node.engine, mr.found.study_uid)


def test_no_prior_found_fails_the_job_only_when_priors_are_required(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    _source(node, monkeypatch)
    assert _fetch(node, _request()) == []
    with pytest.raises(PriorsFailed, match=r"source 'pacs' .* has no prior study of the patient \(priors.optional"):
        _fetch(node, _request(optional=False))


def test_the_timeout_counts_from_the_first_wait_not_from_the_jobs_creation(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that sat two hours in a busy queue still waits out its 1 h for a PACS that is down."""
    source = _source(node, monkeypatch)
    source.find_error = "source 'pacs': no connection"
    now = utcnow()
    with node.engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == node.job_id).values(created_at=now - dt.timedelta(hours=2)))
    with pytest.raises(PriorsWaiting) as waiting:
        _fetch(node, _request(timeout="1h"), now=lambda: now)
    assert waiting.value.retry_at == now + dt.timedelta(seconds=10)  # retry_delay
    later = now + dt.timedelta(minutes=59)
    with pytest.raises(PriorsWaiting):
        _fetch(node, _request(timeout="1h"), now=lambda: later)
    with pytest.raises(PriorsFailed, match="no connection; gave up: .*priors.timeout = 3600 s of the job's first wait"):
        _fetch(node, _request(timeout="1h"), now=lambda: now + dt.timedelta(hours=1))


def test_a_retrieve_runs_on_the_pool_while_the_job_waits_and_a_gone_processs_retrieve_is_tried_again(
    node: Node, mr: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(node, monkeypatch, mr)
    release = threading.Event()
    source.on_move = lambda uid: release.wait(30)
    done: list[int] = []
    finished = threading.Event()
    pool = Retrieves(node.process.id, done=lambda job_id: (done.append(job_id), finished.set()))
    pool.start()
    try:
        # The job does not wait for the retrieve: it is deferred, the row says who retrieves it.
        with pytest.raises(PriorsWaiting, match=f"waiting for the retrieve of prior study {mr.found.study_uid}"):
            _fetch(node, _request(), retrieves=pool)
        with pytest.raises(PriorsWaiting):  # asked again meanwhile: no second retrieve
            _fetch(node, _request(), retrieves=pool)
        with node.engine.connect() as conn:
            assert conn.execute(select(PriorFetch.state, PriorFetch.owner)).one() == ("retrieving", node.process.id)
        release.set()
        assert finished.wait(30)
        assert done == [node.job_id]  # the runner is told: it makes the job due
        assert [p.study_uid for p in _fetch(node, _request(), retrieves=pool)] == [mr.found.study_uid]
        assert source.moves == [mr.found.study_uid]
    finally:
        release.set()
        pool.stop()
    # A row left "retrieving" by a process that is gone (stopped mid-retrieve) is retrieved again.
    with node.engine.begin() as conn:
        conn.execute(update(PriorFetch).values(state="retrieving", owner="gone-process"))
    assert [p.study_uid for p in _fetch(node, _request())] == [mr.found.study_uid]
    assert source.moves == [mr.found.study_uid] * 2


def test_a_retrieve_ended_by_a_missing_or_empty_status_names_it() -> None:
    """pynetdicom ends a C-MOVE/C-GET early with an empty data set (no response in time, association lost);
    a missing status must read the same, not raise."""
    pending = Dataset()
    pending.Status = 0xFF00
    assert priors._final(iter([(pending, None), (None, None), (pending, None)])) is None
    empty = priors._final(iter([(pending, None), (Dataset(), None)]))
    assert empty is not None and "Status" not in empty
    src = Config.model_validate(
        {"sources": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}]}
    ).sources[0]
    with pytest.raises(SourceError, match="the C-GET of study 1.2.3 got no response"):
        priors._retrieved(src, "C-GET", "1.2.3", "NODE", None)
