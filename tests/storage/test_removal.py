"""Deleting stored instances: rows first (in the caller's transaction), then files; a row that changed meanwhile
is kept, a file already gone is skipped, deliveries keep their history and empty series directories go."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, Table, select

from node.index.db import make_engine, migrate
from node.index.models import Delivery, Instance, Patient, Series, Study
from node.storage.layout import Storage
from node.storage.removal import Removed, delete_instances

SERIES = "1.2.826.0.1.3680043.8.498.40"


def _table(model: type) -> Table:
    return model.__table__  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def store(tmp_path: Path) -> tuple[Engine, Storage, list[tuple[int, str]]]:
    """A series of three stored instances (revision 1, 2 and 2; 10, 20 and 30 bytes), each queued for pacs."""
    storage = Storage(tmp_path / "data")
    storage.prepare()
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    migrate(engine)
    items = []
    with engine.begin() as conn:
        conn.execute(_table(Patient).insert().values(id=1, patient_id="P1", patient_name="REMOVAL"))
        conn.execute(
            _table(Study).insert().values(id=1, study_instance_uid="1.2.826.0.1.3680043.8.498.4", patient_fk=1)
        )
        conn.execute(_table(Series).insert().values(id=1, series_instance_uid=SERIES, study_fk=1, instance_count=3))
        for k, revision in ((1, 1), (2, 2), (3, 2)):
            uid = f"{SERIES}.{k}"
            path = storage.path_for(SERIES, uid)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 10 * k)
            rel = storage.relative(path)
            conn.execute(
                _table(Instance)
                .insert()
                .values(
                    id=k,
                    sop_instance_uid=uid,
                    series_fk=1,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    file_path=rel,
                    file_size=10 * k,
                    checksum="0" * 64,
                    revision=revision,
                )
            )
            conn.execute(
                _table(Delivery).insert().values(instance_fk=k, series_fk=1, destination="pacs", sop_instance_uid=uid)
            )
            items.append((k, rel))
    yield engine, storage, items
    engine.dispose()


def _left(engine: Engine) -> tuple[list[int], int, list[int | None]]:
    """(instance ids, the series' instance count, each delivery's instance_fk)."""
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(select(_table(Instance).c.id).order_by(_table(Instance).c.id))]
        count = conn.execute(select(_table(Series).c.instance_count)).scalar_one()
        fks = [r[0] for r in conn.execute(select(_table(Delivery).c.instance_fk).order_by(_table(Delivery).c.id))]
    return ids, count, fks


def test_rows_and_files_go_deliveries_stay_and_the_empty_series_directory_is_pruned(store) -> None:
    engine, storage, items = store
    series_dir = storage.absolute(items[0][1]).parent
    with engine.begin() as conn:
        removed = delete_instances(conn, storage, 1, items)
    assert removed == Removed(instances=3, files=3, bytes=60)
    assert _left(engine) == ([], 0, [None, None, None])  # the delivery history is kept
    assert not series_dir.exists() and list(storage.iter_stored()) == []


def test_a_row_that_changed_meanwhile_is_kept_with_its_file(store) -> None:
    engine, storage, items = store
    (one, rel1), (two, rel2), three = items
    # Instance 1 was re-sent meanwhile and now has another file: the listed one is not its file any more.
    stale = [(one, "storage/00/elsewhere.dcm"), (two, rel2), three]
    with engine.begin() as conn:
        removed = delete_instances(conn, storage, 1, stale, revision=2)
    assert removed == Removed(instances=2, files=2, bytes=50)
    assert _left(engine) == ([1], 1, [1, None, None])
    assert storage.absolute(rel1).exists()  # its directory holds it still: not pruned
    # Asked for revision 2 only, a revision-1 row is kept even when listed as it is.
    with engine.begin() as conn:
        assert delete_instances(conn, storage, 1, [(one, rel1)], revision=2) == Removed()
    assert _left(engine)[0] == [1]


def test_a_file_already_gone_is_skipped_and_its_row_still_deleted(store) -> None:
    """What a crash between the file removals and the commit leaves: the next clean-up finishes the job."""
    engine, storage, items = store
    storage.absolute(items[1][1]).unlink()
    with engine.begin() as conn:
        removed = delete_instances(conn, storage, 1, items)
    assert removed == Removed(instances=3, files=2, bytes=40)
    assert _left(engine)[:2] == ([], 0)


def test_rows_come_back_if_the_caller_does_not_commit(store) -> None:
    """Rows first, files next, commit last: a failure before the commit leaves rows without files (which a
    later clean-up and recovery find), never files without rows (which recovery would index again)."""
    engine, storage, items = store
    with pytest.raises(RuntimeError, match="crash before commit"):
        with engine.begin() as conn:
            delete_instances(conn, storage, 1, items[:1])
            raise RuntimeError("crash before commit")
    assert _left(engine) == ([1, 2, 3], 3, [1, 2, 3])
    assert not storage.absolute(items[0][1]).exists()
