"""A slow PACS holds up no other job: the node's one job worker runs another job while a prior is retrieved.

The source is a real DICOM peer in this process (pynetdicom): it answers the node's C-FIND with the patient's
prior study and, on the C-MOVE, holds the association until the test lets it go, then sends the prior's real
files to the node by C-STORE. With ``[jobs] workers = 1``, the job asking for priors must not sit on that
worker while the C-MOVE stalls: the other job of the same series runs and succeeds meanwhile, and the job
with priors succeeds once the prior has arrived.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from helpers import NodeProcess, free_port, storescu, variants, wait_for
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

PRIOR_DATE = "20130115"
#: The longest the source holds a C-MOVE (the test lets it go much sooner).
STALL = 120.0


class SlowSource:
    """A Q/R SCP holding one prior study whose C-MOVE waits for :attr:`release` before it sends anything."""

    def __init__(self, prior: list[Path], node_port: int) -> None:
        self.prior = [pydicom.dcmread(p) for p in prior]
        self.node_port = node_port
        self.release = threading.Event()
        self.moving = threading.Event()
        self.port = free_port()
        self.ae = AE(ae_title="SLOWPACS")
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        self.ae.add_requested_context(CTImageStorage, str(self.prior[0].file_meta.TransferSyntaxUID))
        self.server: Any = None

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        d = self.prior[0]
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = d.StudyInstanceUID
        match.StudyDate = PRIOR_DATE
        match.StudyDescription = ""
        match.ModalitiesInStudy = "CT"
        match.NumberOfStudyRelatedInstances = len(self.prior)
        yield 0xFF00, match

    def _move(self, event: Any) -> Iterator[Any]:
        yield "127.0.0.1", self.node_port
        yield len(self.prior)
        self.moving.set()
        self.release.wait(STALL)  # the slow part: an archive fetching the study from tape, say
        for d in self.prior:
            yield 0xFF00, d

    def __enter__(self) -> SlowSource:
        handlers = [(evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """The real CT head as the new study; 5 of its slices under new UIDs, two years before, as the prior."""
    root = tmp_path_factory.mktemp("slow-source")
    current = variants.write(variants.load("ct-head"), root / "current")
    prior = variants.make("ct-head")[:5]
    for d in prior:
        d.StudyDate = d.SeriesDate = PRIOR_DATE
    return current, variants.write(prior, root / "prior")


def _jobs(node: NodeProcess) -> dict[str, tuple[str, str]]:
    return {r[0]: (r[1], r[2]) for r in node.query("select rule, state, result from job")}


def test_a_stalled_retrieve_holds_up_no_other_job_on_the_only_worker(
    node: NodeProcess, files: tuple[list[Path], list[Path]]
) -> None:
    current, prior = files
    with SlowSource(prior, node.port) as source:
        node.extra_config = f"""
[tracker]
stable_after = 1

[jobs]
workers = 1

[[sources]]
name = "pacs"
ae_title = "SLOWPACS"
host = "127.0.0.1"
port = {source.port}
timeout = 10
retrieve_timeout = {STALL + 60:g}

[[rules]]
name = "follow-up"
match = {{ Modality = "CT" }}
[[rules.actions]]
type = "plugin"
plugin = "threshold-seg"
priors = {{ from = "pacs", modality = "CT", within_days = 3650, max = 1 }}

[[rules]]
name = "plain"
match = {{ Modality = "CT" }}
[[rules.actions]]
type = "plugin"
plugin = "threshold-seg"
"""
        node.start()
        r = storescu(node.port, current)
        assert r.returncode == 0, r.stderr
        assert source.moving.wait(60), f"the node never asked for the prior\n{_jobs(node)}\n{node.log()[-3000:]}"

        # The C-MOVE stalls; the one worker runs the other job of the series meanwhile.
        def plain_done() -> bool:
            return _jobs(node).get("plain", ("", ""))[0] in ("succeeded", "failed")

        wait_for(plain_done, 90, f"the other job to end while the retrieve stalls\n{_jobs(node)}\n{node.log()[-3000:]}")
        assert _jobs(node)["plain"][0] == "succeeded", _jobs(node)
        assert not source.release.is_set()
        assert node.query("select state, owner is not null from prior_fetch") == [("retrieving", 1)]
        assert _jobs(node)["follow-up"][0] == "pending"  # deferred, not holding the worker

        source.release.set()

        def follow_up_done() -> bool:
            return _jobs(node)["follow-up"][0] in ("succeeded", "failed")

        wait_for(follow_up_done, 90, f"the job with priors to end\n{_jobs(node)}\n{node.log()[-3000:]}")
    state, result = _jobs(node)["follow-up"]
    assert state == "succeeded", result
    assert f"priors from pacs: {PRIOR_DATE} (1 series)" in result
    assert node.query("select state, received from prior_fetch") == [("retrieved", len(prior))]
