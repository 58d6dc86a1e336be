"""The REST API against its own OpenAPI spec: schemathesis sends what the spec allows (and edge cases);
no request may end in a server error or an answer the spec does not describe."""

from __future__ import annotations

import shutil
import subprocess
import sys

from helpers import make_ct_series, storescu, wait_for
from helpers.web import TOKEN, request

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(node, tmp_path):
    node.extra_config = f'[tracker]\nstable_after = 1\n[web]\ntoken = "{TOKEN}"\n'
    node.start()
    r = storescu(node.port, make_ct_series(tmp_path / "ct", 4, patient_name="Müller^Zoë"))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: node.query("SELECT state FROM series")[0][0] == "triggered", 30, "the series to settle")
    url = f"http://127.0.0.1:{node.web_port}"
    assert request(url + "/openapi.json", token=None)[0] == 200
    st = shutil.which("st") or shutil.which("schemathesis")
    cmd = [st] if st else [sys.executable, "-m", "schemathesis.cli"]
    out = tmp_path / "schemathesis.log"
    with open(out, "w") as f:
        result = subprocess.run(
            [
                *cmd,
                "run",
                f"{url}/openapi.json",
                "-H",
                f"Authorization: Bearer {TOKEN}",
                "--checks",
                CHECKS,
                "--max-examples",
                "30",
                "--seed",
                "1",
                "--workers",
                "1",
                "--request-timeout",
                "30",
                "--generation-allow-x00",
                "false",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=900,
            cwd=tmp_path,
        )
    text = out.read_text()
    assert result.returncode == 0, text[-6000:]
    assert "No issues found" in text or "passed" in text, text[-3000:]
