"""``[plugins] paths``: a local plugin module in a site folder runs in the node's job processes, no PYTHONPATH.

The node imports the module when it compiles its rules; each job imports it again in a process forked from
the fork server, which must have the folder on its sys.path too.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers import series_files, storescu_exact, wait_for
from helpers.site_plugin import VERSION, write_site_plugin


def test_a_job_runs_a_plugin_found_through_plugin_paths(node, tmp_path: Path):
    folder = tmp_path / "opt-plugins"
    local = write_site_plugin(folder, "site_bone_paths")
    assert str(folder) not in os.environ.get("PYTHONPATH", "")
    node.extra_config = f"""
[tracker]
stable_after = 1
[plugins]
paths = ["{folder}"]
local = {{ bone = "{local}" }}
[[rules]]
name = "ct-bone"
match = {{ Modality = "CT" }}
actions = [{{ type = "plugin", plugin = "bone", params = {{ lower = 250 }} }}]
"""
    node.start()
    files = series_files("ct-head-philips-5mm")[:8]  # 8 slices of a real head CT (JPEG 2000 lossless)
    assert [r.returncode for r in storescu_exact(node.port, files, tmp_path, ae=node.ae_title)] == [0]

    def finished() -> list[tuple]:
        return node.query("select state, software, last_error from job where state in ('succeeded', 'failed')")

    [(state, software, error)] = wait_for(finished, 120, "the plugin job to finish", interval=0.3)
    assert state == "succeeded", error
    assert software == f"bone {VERSION}"
    outputs = node.query("select sop_class_uid from instance where job_fk is not null")
    assert outputs == [("1.2.840.10008.5.1.4.1.1.66.4",)]  # one Segmentation
