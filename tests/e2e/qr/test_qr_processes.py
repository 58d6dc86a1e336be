"""``[node] processes = 2``: a C-MOVE that the receiver process answers is delivered by the node process's
dispatcher (the receiver queues the deliveries in the shared index and tells its parent to send them).

Which process takes an association is the kernel's choice (SO_REUSEPORT), so C-MOVEs are repeated, a
bounded number of times, until the receiver has answered one; each must have delivered everything.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pydicom
from helpers import (
    PEER_ENV,
    NodeProcess,
    StoreSCP,
    dataset_bytes,
    dcmtk,
    read_sop_uid,
    series_files,
    storescu,
    wait_for,
)

CT = "ct-head-philips-5mm"


def test_a_move_answered_by_a_receiver_process_is_delivered_by_the_node_process(tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "storescp").start()
    node = NodeProcess(tmp_path / "node", extra_config="processes = 2\n" + scp.destination("scp"))
    try:
        node.start()
        wait_for(lambda: re.search(r"receiver process 1 \(pid \d+\) is listening", node.log()), 60, "the receiver")
        files = series_files(CT)
        assert storescu(node.port, files).returncode == 0
        ct = pydicom.dcmread(files[0], stop_before_pixels=True)
        move = [
            dcmtk("movescu"),
            "-d",
            "-S",
            "-aec",
            node.ae_title,
            "-aem",
            scp.ae_title,
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            f"StudyInstanceUID={ct.StudyInstanceUID}",
            "-k",
            f"SeriesInstanceUID={ct.SeriesInstanceUID}",
            "127.0.0.1",
            str(node.port),
        ]
        for _ in range(30):
            r = subprocess.run(move, capture_output=True, text=True, errors="replace", env=PEER_ENV, timeout=120)
            out = r.stdout + r.stderr
            final = out[out.rindex("Received Final Move Response") :]
            assert "0x0000: Success" in final and re.search(r"Completed Suboperations\s*:\s*28\b", final), final
            if re.search(r"\[receiver pid \d+\] C-MOVE SERIES .* final 0x0000: 28 completed", node.log()):
                break
        else:
            raise AssertionError("30 C-MOVEs and the receiver process answered none")
        received = {read_sop_uid(p): p for p in scp.received()}
        for f in files:
            assert dataset_bytes(received[read_sop_uid(f)]) == dataset_bytes(f)
    finally:
        code = node.stop()
        scp.stop()
    assert "Traceback" not in node.log(), node.log()[-4000:]
    assert code in (0, None), f"node exited with {code}\n{node.log()[-4000:]}"
