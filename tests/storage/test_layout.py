"""The file store's layout: names a peer cannot choose, one directory per series, moves that never leave a
half-written or lost file, and index paths that cannot point outside the data directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from node.index.cluster import file_name as scratch_name
from node.storage.layout import Storage

HEX_NAME = re.compile(r"[0-9a-f]{32}-[0-9a-f]{8}\.dcm")


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    s = Storage(tmp_path / "data")
    assert s.prepare() is True  # a new data directory
    return s


def test_prepare_says_whether_the_data_directory_is_new(storage: Storage) -> None:
    assert {p.name for p in storage.root.iterdir()} == {"storage", "tmp", "quarantine"}
    assert Storage(storage.root).prepare() is False


def test_each_process_has_its_own_temp_and_quarantine_directory_with_a_safe_name(storage: Storage) -> None:
    a = Storage(storage.root, "pacs-gw.example.org:4242:0a1b2c3d")
    b = Storage(storage.root, "pacs-gw.example.org:4243:99aa88bb")
    a.prepare()
    b.prepare()
    assert a.tmp == storage.tmp_root / "pacs-gw.example.org_4242_0a1b2c3d" and a.tmp.is_dir()
    assert a.quarantine == storage.quarantine_root / "pacs-gw.example.org_4242_0a1b2c3d"
    assert a.tmp != b.tmp and a.quarantine != b.quarantine and b.tmp.is_dir()
    for hostile in ("../../etc:1:ab", "..", ".", "a/b\\c:1:ff", "\x00"):
        name = scratch_name(hostile)
        assert name not in (".", "..", "") and "/" not in name and "\x00" not in name, name
        assert (storage.tmp_root / name).parent == storage.tmp_root


def test_clearing_a_temp_entry_counts_its_files_and_stays_under_tmp(storage: Storage) -> None:
    other = Storage(storage.root, "host:1:00000001")
    other.prepare()
    (other.tmp / "job-3-1").mkdir()
    for f in (other.tmp / "rx-1.part", other.tmp / "job-3-1" / "out.dcm"):
        f.write_bytes(b"x")
    (storage.tmp / "mine.part").write_bytes(b"y")
    assert storage.clear_temp(other.tmp) == 2 and not other.tmp.exists()
    assert (storage.tmp / "mine.part").is_file()
    with pytest.raises(ValueError, match="is not an entry of"):
        storage.clear_temp(storage.files)


def test_uids_become_hex_names_under_storage_whatever_a_peer_sends(storage: Storage) -> None:
    for series, sop in [("../../etc", "../passwd"), ("/abs/path", "a\x00b"), ("1.2.3", "1.2.3.4")]:
        path = storage.path_for(series, sop)
        assert path.is_relative_to(storage.files), path
        assert HEX_NAME.fullmatch(path.name), path.name
        rel = path.relative_to(storage.files).parts
        assert len(rel) == 3 and len(rel[0]) == 2 and rel[1].startswith(rel[0]) and len(rel[1]) == 32, rel


def test_a_series_shares_one_directory_and_a_duplicate_gets_its_own_name(storage: Storage) -> None:
    a, b = storage.path_for("1.2.3", "1.2.3.1"), storage.path_for("1.2.3", "1.2.3.2")
    again = storage.path_for("1.2.3", "1.2.3.1")
    assert a.parent == b.parent == again.parent
    assert a.name[:32] == again.name[:32] and a.name != again.name  # same instance, a token of its own
    assert storage.path_for("1.2.4", "1.2.3.1").parent != a.parent


def test_index_paths_are_relative_and_may_not_leave_the_data_directory(storage: Storage) -> None:
    path = storage.path_for("1.2.3", "1.2.3.1")
    rel = storage.relative(path)
    assert rel.startswith("storage/") and storage.absolute(rel) == path
    with pytest.raises(ValueError, match=r"index path '\.\./outside\.dcm' points outside the data directory"):
        storage.absolute("../outside.dcm")


def test_place_moves_the_file_and_survives_its_series_directory_being_pruned(storage: Storage) -> None:
    first, second = storage.path_for("1.2.3", "1.2.3.1"), storage.path_for("1.2.3", "1.2.3.2")
    tmp = storage.tmp / "rx-1.part"
    tmp.write_bytes(b"first")
    storage.place(tmp, first)
    assert first.read_bytes() == b"first" and not tmp.exists()
    # Retention empties and prunes the series directory (the store still remembers it as existing).
    storage.remove(first)
    assert storage.prune_dir(first.parent) is True and not first.parent.exists()
    tmp.write_bytes(b"second")
    storage.place(tmp, second)
    assert second.read_bytes() == b"second"
    assert list(storage.iter_stored()) == [second]


def test_a_missing_temp_file_is_an_error_not_a_silent_success(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError):
        storage.place(storage.tmp / "never-written.part", storage.path_for("1.2.3", "1.2.3.1"))


def test_prune_keeps_a_directory_with_files_and_refuses_what_is_not_a_series_directory(storage: Storage) -> None:
    path = storage.path_for("1.2.3", "1.2.3.1")
    tmp = storage.tmp / "rx.part"
    tmp.write_bytes(b"x")
    storage.place(tmp, path)
    assert storage.prune_dir(path.parent) is False and path.exists()
    for wrong in (storage.files, storage.tmp, storage.root.parent):
        with pytest.raises(ValueError, match="is not a series directory under"):
            storage.prune_dir(wrong)
    storage.remove(path)
    storage.remove(path)  # removing twice is fine: a file already gone is gone


def test_iter_stored_lists_instances_only(storage: Storage) -> None:
    path = storage.path_for("1.2.3", "1.2.3.1")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    (path.parent / "notes.txt").write_text("not an instance")
    assert list(storage.iter_stored()) == [path]
    assert list(Storage(storage.root / "elsewhere").iter_stored()) == []
