"""Talking to a node's web side in tests: its REST API with a token, and the config of the web tests' node."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import NodeProcess, StoreSCP

TOKEN = "web-test-token-0123456789"
#: Debian's Chromium, which the browser tests drive through Playwright (the ``browser`` fixture).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EVIL_NAME = '<script>window.__pwned = 1</script>^<img src=x onerror="window.__pwned=2">'


@dataclass
class WebNode:
    node: NodeProcess
    pacs: StoreSCP
    down_port: int
    ct_series_uid: str
    evil_series_uid: str
    root: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.node.web_port}"

    def get(self, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
        return request(self.url + path, token=token)

    def post(self, path: str, body: dict | None = None, token: str | None = TOKEN) -> tuple[int, Any]:
        return request(self.url + path, token=token, body=body if body is not None else {})


def request(
    url: str, token: str | None = TOKEN, body: dict | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=h, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw, ctype, code = r.read(), r.headers.get("Content-Type", ""), r.status
    except urllib.error.HTTPError as e:
        raw, ctype, code = e.read(), e.headers.get("Content-Type", ""), e.code
    return code, json.loads(raw) if ctype.startswith("application/json") else raw


def web_config(pacs: StoreSCP, down_port: int) -> str:
    return f"""
[tracker]
stable_after = 1.5

[web]
token = "{TOKEN}"

{pacs.destination("pacs")}
[[destinations]]
name = "down"
ae_title = "DOWN"
host = "127.0.0.1"
port = {down_port}
[destinations.retry]
initial_delay = 0.2
give_up_after = 0.001

[[rules]]
name = "ct-seg"
[rules.match]
Modality = "CT"
[[rules.actions]]
type = "plugin"
plugin = "threshold-seg"
send_to = ["pacs"]
[[rules.actions]]
type = "forward"
to = ["pacs", "down"]
"""
