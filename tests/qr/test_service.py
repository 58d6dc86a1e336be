"""node.qr.QueryRetrieve on a real index with real series: what a C-FIND, C-MOVE and C-GET requestor is told.

The association is a recording channel (conftest.Channel); the network side is the acceptor's
(tests/receive/test_acceptor_qr.py) and the whole path runs against DCMTK and Orthanc in tests/e2e/qr.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from pathlib import Path

import pydicom
import pytest
from helpers import read_sop_uid, series_files
from pydicom import Dataset
from sqlalchemy import select

from node.index.models import AuditEvent, Delivery
from node.index.states import DeliveryState
from node.qr import service as service_module
from node.qr.service import QueryRetrieve
from node.send import queue

from .conftest import (
    ASSOC,
    CT,
    MR,
    PATIENT_FIND,
    PATIENT_GET,
    PATIENT_MOVE,
    STUDY_FIND,
    STUDY_GET,
    STUDY_MOVE,
    Channel,
    Stored,
)


def _service(stored: Stored, extra: str = "", wake=lambda dests: None) -> QueryRetrieve:  # type: ignore[no-untyped-def]
    return QueryRetrieve(stored.config(extra), stored.engine, stored.engine, stored.storage, wake, writer=stored.writer)


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def _first(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(series_files(name)[0], stop_before_pixels=True)


def _deliver(  # type: ignore[no-untyped-def]
    stored: Stored, *, fail: frozenset[str] = frozenset(), warn: frozenset[str] = frozenset(), sent: list | None = None
):
    """A dispatcher that sends everything due for "pacs" at once when woken (``fail``/``warn``: by SOP Instance
    UID; ``sent``: gets the UIDs it sent)."""

    def wake(destinations: list[str]) -> None:
        assert destinations == ["pacs"]
        items = queue.claim(stored.engine, "pacs", 10_000, stored.process.id)
        if sent is not None:
            sent.extend(i.sop_instance_uid for i in items)
        outcomes = [
            queue.Outcome(i.id, DeliveryState.FAILED, 0xA700, error="refused")
            if i.sop_instance_uid in fail
            else queue.Outcome(
                i.id,
                DeliveryState.DELIVERED,
                0xB000 if i.sop_instance_uid in warn else 0,
                warning="coerced" if i.sop_instance_uid in warn else "",
            )
            for i in items
        ]
        queue.record(stored.engine, outcomes, stored.process.id)

    return wake


# -- C-FIND ---------------------------------------------------------------------------------------


def test_a_study_query_answers_one_pending_response_per_study(stored: Stored) -> None:
    ct, mr = _first(CT), _first(MR)
    channel = Channel()
    final = _service(stored).find(
        ASSOC, STUDY_FIND, _identifier("STUDY", StudyInstanceUID="", PatientID="", StudyDate=""), channel
    )
    assert final.status == 0x0000, final
    found = {str(ds.StudyInstanceUID): ds for ds, _ in channel.pendings}
    assert set(found) == {ct.StudyInstanceUID, mr.StudyInstanceUID}
    assert found[ct.StudyInstanceUID].PatientID == ct.PatientID
    assert found[ct.StudyInstanceUID].QueryRetrieveLevel == "STUDY"
    assert found[ct.StudyInstanceUID].RetrieveAETitle == "DICOM_NODE"
    stored.writer.submit(lambda tx: None).result(10)  # the audit event went in before this
    with stored.engine.connect() as conn:
        kind, calling, status, detail = conn.execute(
            select(AuditEvent.kind, AuditEvent.calling_ae, AuditEvent.status, AuditEvent.detail)
            .order_by(AuditEvent.id.desc())
            .limit(1)
        ).one()
    assert (kind, calling, status) == ("query", "FINDSCU", 0)
    assert detail == "C-FIND STUDY (study root) on (all): 2 match(es), 2 sent"


def test_an_image_query_under_patient_root_finds_the_series_instances(stored: Stored) -> None:
    ct = _first(CT)
    channel = Channel(PATIENT_FIND)
    ident = _identifier(
        "IMAGE",
        PatientID=ct.PatientID,
        StudyInstanceUID=ct.StudyInstanceUID,
        SeriesInstanceUID=ct.SeriesInstanceUID,
        SOPInstanceUID="",
    )
    final = _service(stored).find(ASSOC, PATIENT_FIND, ident, channel)
    assert final.status == 0x0000, final
    assert {str(ds.SOPInstanceUID) for ds, _ in channel.pendings} == {read_sop_uid(f) for f in series_files(CT)}


def test_an_attribute_the_node_cannot_query_is_refused_with_the_offending_element(stored: Stored) -> None:
    ident = _identifier("STUDY", StudyInstanceUID="")
    ident.add_new(0x00090010, "LO", "ACME")  # a private creator: nothing the node can match
    channel = Channel()
    final = _service(stored).find(ASSOC, STUDY_FIND, ident, channel)
    assert final.status == 0xA900 and final.offending == (0x00090010,), final
    assert "(0009,0010)" in final.comment and not channel.pendings


def test_more_matches_than_max_results_are_refused_before_any_is_sent(stored: Stored) -> None:
    channel = Channel()
    final = _service(stored, "[qr]\nmax_results = 1\n").find(
        ASSOC, STUDY_FIND, _identifier("STUDY", StudyInstanceUID=""), channel
    )
    assert final.status == 0xA700 and final.comment == "over 1 matches: narrow the query ([qr] max_results)"
    assert not channel.pendings


@pytest.mark.parametrize("max_results", [0, 40, 10_000])
def test_a_find_holds_a_page_of_values_at_a_time_and_reads_nothing_while_it_answers(
    stored: Stored, monkeypatch: pytest.MonkeyPatch, max_results: int
) -> None:
    """Memory stays bounded (one page of plain values, also with max_results = 0) and no read transaction is
    open while a response is written (the requestor may be slow)."""
    monkeypatch.setattr(service_module, "FIND_PAGE", 7)
    held: list[int] = []
    real = service_module.query.find_capped

    def find_capped(conn, q, cap, **kw):  # type: ignore[no-untyped-def]
        page, more = real(conn, q, cap, **kw)
        held.append(len(page))
        return page, more

    monkeypatch.setattr(service_module.query, "find_capped", find_capped)
    service = _service(stored, f"[qr]\nmax_results = {max_results}\n")
    opened = 0
    connect = stored.engine.connect

    class Reader:  # the service's read engine, counting its open connections
        @contextlib.contextmanager
        def connect(self):  # type: ignore[no-untyped-def]
            nonlocal opened
            opened += 1
            try:
                with connect() as conn:
                    yield conn
            finally:
                opened -= 1

    service.reader = Reader()  # type: ignore[assignment]
    channel = Channel(on_pending=lambda: assert_no_read(opened))
    final = service.find(ASSOC, STUDY_FIND, _identifier("IMAGE", SOPInstanceUID=""), channel)
    everything = {read_sop_uid(f) for name in (CT, MR) for f in series_files(name)}
    if max_results == 40:
        assert final.status == 0xA700 and not channel.pendings
        return
    assert final.status == 0x0000, final
    sent = [str(ds.SOPInstanceUID) for ds, _ in channel.pendings]
    assert sorted(sent) == sorted(everything), "each match once, across pages"
    assert max(held) <= 7 and len(held) >= len(everything) // 7


def assert_no_read(opened: int) -> None:
    assert opened == 0, "a response was written with a read connection open"


def test_a_cancelled_find_stops_sending_matches(stored: Stored) -> None:
    channel = Channel(cancel_after=3)
    final = _service(stored).find(ASSOC, STUDY_FIND, _identifier("IMAGE", SOPInstanceUID=""), channel)
    assert final.status == 0xFE00, final
    assert len(channel.pendings) == 3


# -- C-MOVE ---------------------------------------------------------------------------------------


def _series_move(name: str) -> Dataset:
    first = _first(name)
    return _identifier("SERIES", StudyInstanceUID=first.StudyInstanceUID, SeriesInstanceUID=first.SeriesInstanceUID)


def _rows(stored: Stored, uids: set[str]) -> dict[str, str]:
    d = Delivery.__table__
    with stored.engine.connect() as conn:
        rows = conn.execute(select(d.c.sop_instance_uid, d.c.state).where(d.c.destination == "pacs")).all()
    return {u: s for u, s in rows if u in uids}


def test_an_unknown_move_destination_is_refused_with_a_message_naming_it(stored: Stored) -> None:
    channel = Channel(STUDY_MOVE)
    final = _service(stored).move(ASSOC, STUDY_MOVE, _series_move(CT), "NOSUCHAE", channel)
    assert final.status == 0xA801
    assert final.comment == "'NOSUCHAE' is not in the node's [[destinations]]"


def test_a_move_queues_the_series_reports_progress_and_a_second_move_sends_it_again(stored: Stored) -> None:
    uids = {read_sop_uid(f) for f in series_files(MR)}
    sent: list[str] = []
    service = _service(stored, wake=_deliver(stored, sent=sent))
    channel = Channel(STUDY_MOVE)
    final = service.move(ASSOC, STUDY_MOVE, _series_move(MR), "PACS", channel)
    assert (final.status, final.completed, final.failed, final.warning) == (0x0000, len(uids), 0, 0), final
    assert set(_rows(stored, uids).values()) == {"delivered"} and sorted(sent) == sorted(uids)

    sent.clear()
    final = service.move(ASSOC, STUDY_MOVE, _series_move(MR), "PACS", Channel(STUDY_MOVE))
    assert (final.status, final.completed) == (0x0000, len(uids)), final
    assert sorted(sent) == sorted(uids), "a C-MOVE asks for another copy: delivered rows are sent again"


def test_failed_and_warned_sub_operations_give_b000_with_the_failed_uids(stored: Stored) -> None:
    files = series_files(CT)
    bad, warned = read_sop_uid(files[0]), read_sop_uid(files[1])
    service = _service(stored, wake=_deliver(stored, fail=frozenset({bad}), warn=frozenset({warned})))
    final = service.move(ASSOC, STUDY_MOVE, _series_move(CT), "PACS", Channel(STUDY_MOVE))
    assert (final.status, final.completed, final.failed, final.warning) == (0xB000, len(files) - 2, 1, 1), final
    assert final.failed_uids == (bad,)


def test_deliveries_removed_meanwhile_are_failed_and_named_in_the_failed_uid_list(stored: Stored) -> None:
    files = series_files(MR)
    gone = {read_sop_uid(files[0]), read_sop_uid(files[1])}
    deliver = _deliver(stored)
    with stored.engine.begin() as conn:
        conn.execute(Delivery.__table__.delete())

    def wake(destinations: list[str]) -> None:  # retention removed two rows before the dispatcher took them
        d = Delivery.__table__
        with stored.engine.begin() as conn:
            conn.execute(d.delete().where(d.c.sop_instance_uid.in_(gone)))
        deliver(destinations)

    final = _service(stored, wake=wake).move(ASSOC, STUDY_MOVE, _series_move(MR), "PACS", Channel(STUDY_MOVE))
    assert (final.status, final.completed, final.failed) == (0xB000, len(files) - 2, 2), final
    assert set(final.failed_uids) == gone


def test_a_move_of_more_instances_than_a_statement_takes_parameters_queues_them(
    postgres_server: object, tmp_path: Path
) -> None:
    """PostgreSQL takes at most 65,535 bound parameters per statement: enqueue's IN lists go in chunks."""
    from helpers.postgres import new_database

    from node.index.db import make_engine, migrate

    engine = make_engine(new_database(postgres_server))
    migrate(engine)
    try:
        with engine.begin() as conn:
            done = queue.enqueue(conn, list(range(1, 70_001)), ["pacs"], again=True)
            assert queue.states_of(conn, list(range(1, 70_001))) == []
    finally:
        engine.dispose()
    assert (done.new, done.ids) == (0, ())


def test_a_move_nothing_delivers_ends_at_move_timeout_and_the_deliveries_stay_queued(stored: Stored) -> None:
    uids = {read_sop_uid(f) for f in series_files(CT)}
    with stored.engine.begin() as conn:  # what the test before left failed
        conn.execute(Delivery.__table__.delete())
    channel = Channel(STUDY_MOVE)
    final = _service(stored, "[qr]\nmove_timeout = 0.6\n").move(ASSOC, STUDY_MOVE, _series_move(CT), "PACS", channel)
    assert (final.status, final.completed, final.failed) == (0xA702, 0, len(uids)), final
    assert final.comment == f"{len(uids)} still queued for pacs: delivered later"
    assert set(final.failed_uids) == uids
    assert set(_rows(stored, uids).values()) == {"queued"}
    assert channel.pendings and channel.pendings[0][1]["remaining"] == len(uids)


def test_a_move_to_a_destination_whose_circuit_is_open_answers_at_once_and_the_deliveries_stay_queued(
    stored: Stored,
) -> None:
    """The destination's last tries failed and the queue waits out its back-off: the requestor is not kept
    waiting for move_timeout (600 s) but told at once what stays queued, and why."""
    uids = {read_sop_uid(f) for f in series_files(CT)}
    with stored.engine.begin() as conn:
        conn.execute(Delivery.__table__.delete())
    seen = queue.load_circuits(stored.engine, ["pacs"])["pacs"]
    now = dt.datetime.now(dt.UTC)
    assert queue.circuit_failed(
        stored.engine, "pacs", seen, 3, now + dt.timedelta(seconds=300), "connection refused", now
    )
    channel = Channel(STUDY_MOVE)
    t0 = time.monotonic()
    try:
        final = _service(stored).move(ASSOC, STUDY_MOVE, _series_move(CT), "PACS", channel)
    finally:
        queue.close_circuit(stored.engine, "pacs")
    assert time.monotonic() - t0 < 30  # not move_timeout: 600 s
    assert (final.status, final.completed, final.failed) == (0xA702, 0, len(uids)), final
    assert final.comment == f"{len(uids)} still queued for pacs: unreachable, delivered later"
    assert set(final.failed_uids) == uids
    assert set(_rows(stored, uids).values()) == {"queued"}


def test_a_move_waiting_when_the_node_stops_answers_at_once_and_leaves_the_rest_queued(stored: Stored) -> None:
    uids = {read_sop_uid(f) for f in series_files(CT)}
    with stored.engine.begin() as conn:
        conn.execute(Delivery.__table__.delete())
    service = _service(stored)  # move_timeout: 600 s
    channel = Channel(STUDY_MOVE, on_pending=service.stop)
    final = service.move(ASSOC, STUDY_MOVE, _series_move(CT), "PACS", channel)
    assert (final.status, final.completed, final.failed) == (0xA702, 0, len(uids)), final
    assert final.comment == f"{len(uids)} still queued for pacs: delivered later"
    assert set(_rows(stored, uids).values()) == {"queued"}


def test_a_cancelled_move_cancels_the_deliveries_it_queued(stored: Stored) -> None:
    uids = {read_sop_uid(f) for f in series_files(MR)}
    with stored.engine.begin() as conn:
        conn.execute(Delivery.__table__.delete())
    channel = Channel(STUDY_MOVE, cancel_after=1)
    final = _service(stored).move(ASSOC, STUDY_MOVE, _series_move(MR), "PACS", channel)
    assert final.status == 0xFE00 and final.remaining == len(uids), final
    assert set(_rows(stored, uids).values()) == {"cancelled"}
    with stored.engine.connect() as conn:  # what the dashboard and `dicom-node queue` show for them
        errors = {
            r[0] for r in conn.execute(Delivery.__table__.select().with_only_columns(Delivery.__table__.c.last_error))
        }
    assert errors == {"(the C-MOVE that queued it was cancelled by its requestor)"}, errors


def test_a_cancelled_move_leaves_what_a_rule_had_queued_before_it(stored: Stored) -> None:
    files = series_files(MR)
    uids = [read_sop_uid(f) for f in files]
    ids = {r.sop_instance_uid: r.instance_id for r in _refs(stored)}
    with stored.engine.begin() as conn:
        conn.execute(Delivery.__table__.delete())
        queue.enqueue(conn, [ids[u] for u in uids[:5]], ["pacs"])  # a rule's forward, before the C-MOVE
    final = _service(stored).move(ASSOC, STUDY_MOVE, _series_move(MR), "PACS", Channel(STUDY_MOVE, cancel_after=1))
    assert final.status == 0xFE00 and final.remaining == len(uids), final
    rows = _rows(stored, set(uids))
    assert {u: rows[u] for u in uids[:5]} == dict.fromkeys(uids[:5], "queued"), "not the C-MOVE's to cancel"
    assert {rows[u] for u in uids[5:]} == {"cancelled"}


def test_a_waiting_move_sends_a_pending_response_even_when_nothing_changes(
    stored: Stored, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "MOVE_HEARTBEAT", 0.1)
    with stored.engine.begin() as conn:
        conn.execute(Delivery.__table__.delete())
    channel = Channel(STUDY_MOVE)
    final = _service(stored, "[qr]\nmove_timeout = 1\n").move(ASSOC, STUDY_MOVE, _series_move(MR), "PACS", channel)
    assert final.status == 0xA702
    n = len(series_files(MR))
    assert len(channel.pendings) >= 4, "about one per 0.1 s while nothing is delivered"
    assert {(p[1]["remaining"], p[1]["completed"]) for p in channel.pendings} == {(n, 0)}


@pytest.mark.parametrize(
    ("abstract", "level", "keys", "missing"),
    [
        (STUDY_MOVE, "STUDY", {"StudyInstanceUID": ""}, "StudyInstanceUID"),
        (STUDY_MOVE, "STUDY", {"StudyInstanceUID": "1.2*"}, "StudyInstanceUID"),
        (STUDY_MOVE, "STUDY", {"PatientID": "*"}, "StudyInstanceUID"),
        (STUDY_GET, "SERIES", {"SeriesInstanceUID": "<ct series>"}, "StudyInstanceUID"),
        (STUDY_GET, "IMAGE", {"StudyInstanceUID": "<ct study>", "SOPInstanceUID": "1.2.3"}, "SeriesInstanceUID"),
        (PATIENT_MOVE, "STUDY", {"StudyInstanceUID": "<ct study>"}, "PatientID"),
        (PATIENT_GET, "PATIENT", {"PatientID": "?"}, "PatientID"),
    ],
)
def test_a_retrieve_without_the_unique_keys_of_its_levels_is_refused_naming_the_key(
    stored: Stored, abstract: str, level: str, keys: dict[str, str], missing: str
) -> None:
    """An empty or wildcard unique key would be universal matching: the whole archive queued or sent."""
    ct = _first(CT)
    real = {"<ct series>": str(ct.SeriesInstanceUID), "<ct study>": str(ct.StudyInstanceUID)}
    ident = _identifier(level, **{k: real.get(v, v) for k, v in keys.items()})
    with stored.engine.begin() as conn:
        conn.execute(Delivery.__table__.delete())
    service = _service(stored)
    channel = Channel(abstract)
    if abstract in (STUDY_MOVE, PATIENT_MOVE):
        final = service.move(ASSOC, abstract, ident, "PACS", channel)
    else:
        final = service.get(ASSOC, abstract, ident, channel)
    assert final.status == 0xA900, final
    assert final.offending == (pydicom.datadict.tag_for_keyword(missing),)
    assert missing in final.comment
    assert not channel.stored and not _rows(stored, {read_sop_uid(f) for f in series_files(CT)})


def test_a_move_matching_nothing_succeeds_with_zero_counts(stored: Stored) -> None:
    final = _service(stored).move(
        ASSOC, STUDY_MOVE, _identifier("STUDY", StudyInstanceUID="1.2.3.999"), "PACS", Channel(STUDY_MOVE)
    )
    assert (final.status, final.completed, final.failed, final.warning) == (0x0000, 0, 0, 0)


# -- C-GET ----------------------------------------------------------------------------------------


def test_a_get_sends_each_stored_file_as_stored(stored: Stored) -> None:
    files = series_files(CT)
    channel = Channel(STUDY_GET)
    final = _service(stored).get(ASSOC, STUDY_GET, _series_move(CT), channel)
    assert (final.status, final.completed, final.failed) == (0x0000, len(files), 0), final
    assert {uid for _, _, uid, _ in channel.stored} == {read_sop_uid(f) for f in files}
    for path, _, uid, syntax in channel.stored:
        meta = pydicom.filereader.read_file_meta_info(path)
        assert (str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)) == (uid, syntax)
    assert [p[1]["remaining"] for p in channel.pendings] == list(range(len(files) - 1, 0, -1))


def test_a_get_whose_sub_operations_all_fail_is_a702_and_some_b000(stored: Stored) -> None:
    files = series_files(CT)
    uids = [read_sop_uid(f) for f in files]
    none = Channel(STUDY_GET, stores={u: (0x0122, "no presentation context for ... in ...") for u in uids})
    final = _service(stored).get(ASSOC, STUDY_GET, _series_move(CT), none)
    assert (final.status, final.failed, set(final.failed_uids)) == (0xA702, len(uids), set(uids)), final
    assert final.comment == f"{len(uids)} not sent: stored syntax not accepted (no transcoding)"

    some = Channel(STUDY_GET, stores={uids[3]: (0xA700, "full")})
    final = _service(stored).get(ASSOC, STUDY_GET, _series_move(CT), some)
    assert (final.status, final.completed, final.failed_uids) == (0xB000, len(uids) - 1, (uids[3],)), final


def test_a_get_of_an_instance_whose_file_is_gone_fails_that_instance_only(stored: Stored, tmp_path: Path) -> None:
    files = series_files(MR)
    channel = Channel(STUDY_GET)
    service = _service(stored)
    victim = stored.storage.absolute(
        next(r.file_path for r in _refs(stored) if r.series_uid == str(_first(MR).SeriesInstanceUID))
    )
    moved = tmp_path / "away.dcm"
    victim.rename(moved)
    try:
        final = service.get(ASSOC, STUDY_GET, _series_move(MR), channel)
    finally:
        moved.rename(victim)
    assert (final.status, final.completed, final.failed) == (0xB000, len(files) - 1, 1), final


def _refs(stored: Stored):  # type: ignore[no-untyped-def]
    from node.index import query

    with stored.engine.connect() as conn:
        return query.instances(conn, query.Query("IMAGE", keys={"SOPInstanceUID": ""}))


def test_a_malformed_date_is_refused_naming_the_key(stored: Stored) -> None:
    channel = Channel()
    final = _service(stored).find(ASSOC, STUDY_FIND, _identifier("STUDY", StudyDate="06.02.2015"), channel)
    assert final.status == 0xA900 and final.offending == (0x00080020,), final
    assert "StudyDate" in final.comment and not channel.pendings
