"""A real Orthanc (the Debian package's /usr/sbin/Orthanc) as a peer PACS for tests: node.demo.peers.Orthanc,
the one the demo and the benchmarks start too (HTTP and DICOM on free ports, storage and index in the given
folder, C-STORE only from ``senders`` calling from 127.0.0.1).

    with Orthanc(tmp_path / "orthanc") as pacs:
        storescu(pacs.dicom_port, files, ae=pacs.aet)
        assert pacs.has_instance(sop_instance_uid)
"""

from __future__ import annotations

from node.demo.peers import Orthanc

__all__ = ["Orthanc"]
