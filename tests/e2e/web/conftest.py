"""A node with a dashboard, fed a real CT (and a patient whose name is a script), for the web tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import NodeProcess, StoreSCP, free_port, make_ct_series, series_files, storescu, wait_for
from helpers.web import CHROMIUM, CHROMIUM_ARGS, EVIL_NAME, WebNode, web_config


@pytest.fixture(scope="module")
def web_node(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):
    """The real CT and a synthetic CT with a hostile patient name, processed and (not) delivered."""
    root = tmp_path_factory.mktemp("web")
    pacs = StoreSCP(root / "pacs").start()
    down_port = free_port()
    node = NodeProcess(root / "node", extra_config=web_config(pacs, down_port)).start()
    try:
        ct = series_files("ct-head-philips-5mm")
        evil = make_ct_series(root / "evil", 3, patient_name=EVIL_NAME)
        for files in (ct, evil):
            r = storescu(node.port, files)
            assert r.returncode == 0, r.stderr
        ct_uid = node.query("SELECT series_instance_uid FROM series WHERE instance_count = 28")[0][0]
        evil_uid = node.query("SELECT series_instance_uid FROM series WHERE instance_count = 3")[0][0]

        def settled() -> bool:
            jobs = dict(node.query("SELECT state, count(*) FROM job GROUP BY state"))
            states = dict(node.query("SELECT destination || ':' || state, count(*) FROM delivery GROUP BY 1"))
            # 28 + 3 sources and one SEG per series to pacs; the sources to 'down', which fails at once.
            return (
                jobs.get("succeeded", 0) == 4
                and states.get("pacs:delivered", 0) == 33
                and states.get("down:failed", 0) == 31
            )

        wait_for(settled, 120, "both series to be processed, delivered to pacs and failed for 'down'")
        yield WebNode(node, pacs, down_port, ct_uid, evil_uid, root)
    finally:
        code = node.stop()
        pacs.stop()
        log = node.log()
        assert "Traceback" not in log, log[-4000:]
        assert code == 0, log[-4000:]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's), one per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
