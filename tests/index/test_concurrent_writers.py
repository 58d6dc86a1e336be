"""Several node processes recording the same studies at once (issue 16: one index, several processes).

Three OS processes, each with its own IndexWriter and Recorder, record the same real series (headers of
shared/data files, new UIDs each round) at the same moment, each in a different order and with different
transaction sizes. On PostgreSQL their transactions really interleave: parent rows and instances are
inserted by two processes at once, and batches lock the same series rows in opposite orders (deadlocks).
On SQLite they take turns on the file's write lock. Either way: every instance is indexed exactly once,
each series counts its instances right, every process gets an answer for every instance and none an error.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import random
from collections import Counter, defaultdict
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from node.dicom.files import read_file_header
from node.index.db import make_engine, migrate
from node.index.records import DuplicatePolicy, InstanceRecord, Recorder, RecordOutcome, to_record
from node.index.writer import IndexWriter

SERIES = ("ct-head-philips-5mm", "mr-t1-sag-siemens")
PROCESSES = 3
ROUNDS = 8


def _real_records(shared_data: Path) -> list[InstanceRecord]:
    out = []
    for name in SERIES:
        for path in sorted((shared_data / "series" / name).iterdir()):
            if path.is_file() and path.name != "DIRFILE":
                header, size, _meta = read_file_header(path)
                out.append(to_record(header, file_path="", file_size=size, checksum="-"))
    return out


def _copy(rec: InstanceRecord, round_: int, process: int) -> InstanceRecord:
    """``rec`` with UIDs of this round (the same in every process) and this process's own file."""
    study = dict(rec.study, study_instance_uid=f"{rec.study['study_instance_uid']}.{round_}")
    series = dict(rec.series, series_instance_uid=f"{rec.series['series_instance_uid']}.{round_}")
    sop = f"{rec.instance['sop_instance_uid']}.{round_}"
    instance = dict(rec.instance, sop_instance_uid=sop, file_path=f"files/{process}/{sop}.dcm")
    return dataclasses.replace(rec, study=study, series=series, instance=instance)


def _order(records: list[InstanceRecord], process: int, rng: random.Random) -> list[InstanceRecord]:
    if process == 0:
        return records
    if process == 1:
        return records[::-1]
    shuffled = list(records)
    rng.shuffle(shuffled)
    return shuffled


class _Retries(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "running it again" in record.getMessage():
            self.count += 1


def _writer_process(
    url: str, policy: DuplicatePolicy, records: list[InstanceRecord], process: int, barrier: Any, results: Any
) -> None:
    """One node process's index writer: each round, all of it at once (0, 1) or in small chunks (2)."""
    retries = _Retries()
    logging.getLogger("node.index.writer").addHandler(retries)
    logging.getLogger("node.index.writer").setLevel(logging.INFO)
    engine = make_engine(url)
    recorder = Recorder(policy)
    writer = IndexWriter(engine)
    writer.start()
    rng = random.Random(process)
    outcomes: list[tuple[int, str, str, str, str | None]] = []
    errors: list[str] = []
    try:
        for round_ in range(ROUNDS):
            mine = _order([_copy(r, round_, process) for r in records], process, rng)
            barrier.wait(timeout=120)
            chunk = len(mine) if process < 2 else rng.randint(1, 6)
            for start in range(0, len(mine), chunk):
                futures: list[tuple[InstanceRecord, Future[RecordOutcome]]] = [
                    (rec, writer.submit(lambda tx, rec=rec: recorder.record(tx, rec)))
                    for rec in mine[start : start + chunk]
                ]
                for rec, fut in futures:
                    try:
                        o = fut.result(timeout=120)
                    except Exception as e:
                        errors.append(f"{rec.sop_instance_uid}: {e!r}")
                        continue
                    outcomes.append((round_, rec.sop_instance_uid, o.kind, rec.instance["file_path"], o.old_file_path))
    except Exception as e:
        errors.append(f"process {process}: {e!r}")
    finally:
        writer.stop()
        engine.dispose()
        results.put((process, outcomes, errors, retries.count))


def _run(url: str, policy: DuplicatePolicy, records: list[InstanceRecord]) -> tuple[list[Any], list[str]]:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_writer_process, args=(url, policy, records, k, barrier, results)) for k in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    outcomes = [o for _k, out, _e, _r in got for o in out]
    errors = [e for _k, _o, errs, _r in got for e in errs]
    print("batches run again after meeting another process's writes:", sum(r for *_x, r in got))
    return outcomes, errors


def _check_index(url: str, records: list[InstanceRecord]) -> dict[str, str]:
    """Every instance once, in its series, which counts it; returns each instance's file."""
    engine = make_engine(url, write=False)
    try:
        with engine.connect() as c:
            rows = c.execute(
                text(
                    "select i.sop_instance_uid, i.file_path, s.series_instance_uid from instance i "
                    "join series s on s.id = i.series_fk"
                )
            ).all()
            series = c.execute(
                text("select series_instance_uid, instance_count, revision_instances, revision from series")
            ).all()
            studies = c.execute(text("select count(*) from study")).scalar()
    finally:
        engine.dispose()
    expected = {
        f"{r.sop_instance_uid}.{n}": f"{r.series['series_instance_uid']}.{n}" for r in records for n in range(ROUNDS)
    }
    assert Counter(sop for sop, _f, _s in rows) == Counter(expected.keys())  # each exactly once
    assert {sop: s for sop, _f, s in rows} == expected
    per_series = Counter(expected.values())
    assert {uid: (count, count, 1) for uid, count in per_series.items()} == {
        uid: (count, rev_count, rev) for uid, count, rev_count, rev in series
    }
    assert studies == len({r.study["study_instance_uid"] for r in records}) * ROUNDS
    return {sop: f for sop, f, _s in rows}


@pytest.fixture(scope="module")
def records(shared_data: Path) -> list[InstanceRecord]:
    return _real_records(shared_data)


@pytest.fixture
def index_url(any_index_url: str) -> str:
    url = any_index_url
    engine = make_engine(url)
    migrate(engine)
    if engine.dialect.name == "postgresql":  # deadlocks are part of the test: find them in 0.1 s rather than 1 s
        with engine.begin() as c:
            c.exec_driver_sql(f"ALTER DATABASE {engine.url.database} SET deadlock_timeout = '100ms'")
    engine.dispose()  # no connection of this process is inherited by the writers
    return url


def test_keep_first_indexes_every_instance_once_and_the_others_are_duplicates(index_url, records):
    outcomes, errors = _run(index_url, "keep_first", records)
    assert errors == []
    files = _check_index(index_url, records)
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    for _round, sop, kind, file_path, _old in outcomes:
        kinds[sop][kind] += 1
        if kind == "new":  # the first copy is the one kept
            assert files[sop] == file_path
    assert len(kinds) == len(files)
    assert all(k == Counter(new=1, duplicate=PROCESSES - 1) for k in kinds.values())


def test_overwrite_keeps_the_last_copy_and_names_every_replaced_file_once(index_url, records):
    outcomes, errors = _run(index_url, "overwrite", records)
    assert errors == []
    files = _check_index(index_url, records)
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    replaced: dict[str, list[str]] = defaultdict(list)
    sent: dict[str, set[str]] = defaultdict(set)
    for _round, sop, kind, file_path, old in outcomes:
        kinds[sop][kind] += 1
        sent[sop].add(file_path)
        if kind == "replaced":
            assert old is not None
            replaced[sop].append(old)
    assert all(k == Counter(new=1, replaced=PROCESSES - 1) for k in kinds.values())
    # Every copy but the one indexed is reported to its writer as replaced, exactly once (so deleted, not
    # left behind unindexed); the one indexed is never reported (so never deleted).
    for sop, paths in sent.items():
        assert sorted(replaced[sop]) == sorted(paths - {files[sop]})
