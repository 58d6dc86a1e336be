"""The demo itself: a PACS, a node, one real CT series, and a narration of its way through the node.

Layout of the data directory (``var/demo`` by default)::

    node.toml           the demo's node config (a rule, a destination, the dashboard's token)
    node.log            the node's log
    node-data/          the node's data: storage/, index.sqlite (not "node/": python -m node must not see it)
    pacs/               the downstream PACS: Orthanc's config, storage/, index/ and log,
                        or the built-in SCP's received/ files and log
    demo-summary.json   what happened, with timings (for scripts)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import signal
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from node.demo import pacs as pacs_mod
from node.demo import peers
from node.demo.procs import child_preexec
from node.demo.steps import SeriesWatch, Step, StepFailed
from node.demo.workdir import prepare

DATA = Path(__file__).resolve().parent / "data" / "ct-head"
NODE_AE = "DICOM_NODE"
PACS_AE = "DEMO_PACS"
SENDER_AE = "DEMO_SCU"
DESTINATION = "pacs"
RULE = "demo-ct"
STABLE_AFTER = 2.0


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and where to look."""


@dataclass
class Options:
    data_dir: Path
    fresh: bool = False
    keep_running: bool = True
    pacs: str = "auto"
    node_port: int = 0
    web_port: int = 0
    pacs_port: int = 0
    pacs_http_port: int = 0
    timeout: float = 300.0


def bundled_series() -> list[Path]:
    files = sorted(DATA.glob("*.dcm"))
    if not files:
        raise DemoError(f"the bundled CT series is missing from {DATA} (a broken installation?)")
    return files


def shown(p: Path) -> str:
    """A path as the user would type it: relative to the current directory when below it."""
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _toml(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def node_config(root: Path, *, node_port: int, web_port: int, pacs_port: int, token: str) -> str:
    return f"""\
# Written by `dicom-node demo`. A node on loopback that segments bone and draws projections of every
# CT series it receives, and sends the results (and the series) to the demo's PACS.
# Run this node again with:  dicom-node run --config {root / "node.toml"}

[node]
ae_title = "{NODE_AE}"
host = "127.0.0.1"
port = {node_port}
data_dir = {_toml(root / "node-data")}
min_free_mb = 100

[tracker]
stable_after = {STABLE_AFTER}        # a series is complete 2 s after its last instance

[jobs]
retry_delay = 2.0

[plugins]
timeout = 300.0

[web]
host = "127.0.0.1"
port = {web_port}
auth = "token"
token = "{token}"

[[destinations]]
name = "{DESTINATION}"
ae_title = "{PACS_AE}"
host = "127.0.0.1"
port = {pacs_port}
transfer_syntax = "none"     # the bundled series is JPEG 2000; send it uncompressed (any viewer shows it)
timeout = 30.0
[destinations.retry]
initial_delay = 1.0
max_delay = 10.0

[[rules]]
name = "{RULE}"
max_attempts = 1             # a failure shows at once instead of being retried
[rules.match]
Modality = "CT"
[[rules.actions]]
type = "plugin"
plugin = "threshold-seg"     # a DICOM SEG: bone, as CT values above 300 HU
params = {{ segments = [{{ label = "Bone", lower = 300, category = "Tissue", type = "Bone" }}] }}
send_to = ["{DESTINATION}"]
[[rules.actions]]
type = "plugin"
plugin = "mip-sc"            # Secondary Captures: maximum intensity projections
send_to = ["{DESTINATION}"]
[[rules.actions]]
type = "forward"             # and the source series, so the PACS shows the SEG on its CT
to = ["{DESTINATION}"]
"""


def _clean_env() -> dict[str, str]:
    """The node's environment without DICOM_NODE_* overrides: the demo's config file says everything."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}


@dataclass
class Demo:
    opts: Options
    out: Console
    root: Path = field(init=False)
    node: peers.NodeRun | None = None
    pacs: Any = None
    t0: dt.datetime | None = None
    steps: list[tuple[float | None, float | None, str]] = field(default_factory=list)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    ports: dict[str, int] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.opts.data_dir.expanduser().absolute()

    # --- paths -------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "node.toml"

    @property
    def node_log(self) -> Path:
        return self.root / "node.log"

    # --- narration -----------------------------------------------------------------------

    def say(self, text: str, *, at: float | None = None, took: float | None = None, style: str = "") -> None:
        when = f"+{at:6.2f} s" if at is not None else " " * 9
        dur = f"  [dim]({took:.2f} s)[/]" if took is not None else ""
        body = f"[{style}]{text}[/]" if style else text
        self.out.print(f"[cyan]{when}[/]  {body}{dur}", highlight=False)
        self.steps.append((at, took, text))

    def elapsed(self, at: dt.datetime) -> float:
        assert self.t0 is not None
        return (at - self.t0).total_seconds()

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> int:
        lock = prepare(self.root, fresh=self.opts.fresh)
        try:
            return self._run()
        finally:
            self.stop()
            lock.close()

    def _run(self) -> int:
        files = bundled_series()
        ports = {
            k: getattr(self.opts, k) or peers.free_port()
            for k in ("node_port", "web_port", "pacs_port", "pacs_http_port")
        }
        self.ports = ports
        self.out.print(
            f"[bold]dicom-node demo[/] in {shown(self.root)}: a node, a downstream PACS and a real CT "
            f"series ({len(files)} images, head phantom)",
            highlight=False,
        )
        self.config_path.write_text(
            node_config(
                self.root,
                node_port=ports["node_port"],
                web_port=ports["web_port"],
                pacs_port=ports["pacs_port"],
                token=self.token,
            )
        )
        self._check_config()
        self._start_pacs()
        self._start_node()
        series_uid = self._send(files)
        self._watch(series_uid, len(files))
        self._confirm_in_pacs()
        if not self.opts.keep_running:
            self.stop()  # before saying where to look, which then says they are stopped
        self._where_to_look()
        self._write_summary(ok=True)
        if self.opts.keep_running:
            self._wait_for_ctrl_c()
        return 0

    def _check_config(self) -> None:
        from node.config import ConfigError
        from node.decide.compile import load_checked_config

        try:
            load_checked_config(self.config_path, environ={})
        except ConfigError as e:
            raise DemoError(
                f"the demo's config does not load (a bug in the demo, or a plugin missing?):\n{e}"
            ) from None

    def _start_pacs(self) -> None:
        t = time.monotonic()
        binary = peers.find_orthanc()
        kind = self.opts.pacs
        if kind == "orthanc" and binary is None:
            raise DemoError(
                "--pacs orthanc: Orthanc is not installed (e.g. apt-get install orthanc); "
                "use --pacs builtin for the built-in storage SCP"
            )
        if kind in ("auto", "orthanc") and binary is not None:
            self.pacs = pacs_mod.OrthancPacs(
                self.root / "pacs",
                binary=binary,
                dicom_port=self.opts_port("pacs_port"),
                http_port=self.opts_port("pacs_http_port"),
                node_ae=NODE_AE,
                node_port=self.ports["node_port"],
                ae_title=PACS_AE,
            )
            try:
                self.pacs.start()
            except peers.PeerError as e:
                if kind == "orthanc":
                    raise DemoError(str(e)) from None
                self.say(f"[yellow]Orthanc did not start ({e}); using the built-in storage SCP instead[/]")
                self.pacs = None
            if self.pacs is not None:
                version = self.pacs.get("/system").get("Version", "?")
                self.say(
                    f"PACS ready: Orthanc {version}, AE {PACS_AE}, DICOM port {self.pacs.dicom_port}, "
                    f"HTTP port {self.pacs.http_port}",
                    took=time.monotonic() - t,
                )
                return
        self.pacs = pacs_mod.BuiltinPacs(self.root / "pacs", dicom_port=self.opts_port("pacs_port"), ae_title=PACS_AE)
        try:
            self.pacs.start()
        except peers.PeerError as e:
            raise DemoError(str(e)) from None
        why = "" if kind == "builtin" else " (Orthanc is not installed)"
        self.say(
            f"PACS ready: built-in storage SCP{why}, AE {PACS_AE}, DICOM port {self.pacs.dicom_port}",
            took=time.monotonic() - t,
        )

    def opts_port(self, name: str) -> int:
        return self.ports[name]

    def _start_node(self) -> None:
        t = time.monotonic()
        self.node = peers.NodeRun(
            self.config_path,
            self.ports["node_port"],
            self.node_log,
            ae_title=NODE_AE,
            calling_ae=SENDER_AE,
            cwd=self.root,
            env=_clean_env(),
            popen={"start_new_session": True, "preexec_fn": child_preexec},
        )
        try:
            self.node.start(timeout=60)
        except peers.PeerError as e:
            raise DemoError(str(e)) from None
        self.say(
            f"node ready: {NODE_AE} on 127.0.0.1:{self.ports['node_port']} (C-ECHO answered), "
            f"rule {RULE!r}: CT -> threshold-seg (SEG) + mip-sc (SC) + the series -> {DESTINATION}",
            took=time.monotonic() - t,
        )

    def _send(self, files: list[Path]) -> str:
        import pydicom

        from node.send.scu import Peer, send_files

        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        peer = Peer("127.0.0.1", self.ports["node_port"], called_ae=NODE_AE, calling_ae=SENDER_AE, timeout=30.0)
        self.t0 = dt.datetime.now(dt.UTC)
        t = time.monotonic()
        self.say(
            f"sending {len(files)} CT images ({first.SeriesDescription}, JPEG 2000 lossless) to {NODE_AE} with C-STORE",
            at=0.0,
        )
        summary = send_files(peer, files)
        if not summary.ok:
            what = summary.errors[0] if summary.errors else (summary.skipped[0] if summary.skipped else ("", "?"))
            raise DemoError(
                f"sending the series to the node failed: {summary.failed} failed, "
                f"{len(summary.skipped)} skipped; {what[0]}: {what[1]}"
            )
        took = time.monotonic() - t
        self.say(f"sent {summary.sent} instances (all answered 0x0000 Success)", at=took, took=took)
        return str(first.SeriesInstanceUID)

    def _watch(self, series_uid: str, expected: int) -> None:
        from rich.status import Status

        from node.config import load_config
        from node.index.db import make_engine

        cfg = load_config(self.config_path, environ={})
        engine = make_engine(cfg.database_url, write=False)
        watch = SeriesWatch(engine, series_uid, expected)
        deadline = time.monotonic() + self.opts.timeout
        status = Status("waiting for the node", console=self.out) if self.out.is_terminal else None
        progress = None
        try:
            if status is not None:
                status.start()
            while True:
                try:
                    progress = watch.poll()
                except StepFailed as e:
                    raise DemoError(str(e)) from None
                except Exception as e:  # the index not there yet (the node creates it at start-up), busy...
                    if time.monotonic() > deadline:
                        raise DemoError(f"cannot read the node's index at {cfg.database_url}: {e}") from None
                    time.sleep(0.2)
                    continue
                for s in progress.steps:
                    self._show(s)
                if progress.done:
                    break
                if status is not None:
                    got = f"received {progress.received}/{expected}; " if progress.received < expected else ""
                    status.update(got + (progress.waiting_for or "working"))
                if self.node is not None and self.node.proc is not None and self.node.proc.poll() is not None:
                    raise DemoError(f"the node exited with status {self.node.proc.returncode}")
                if not self.pacs.alive():
                    raise DemoError(f"the PACS ({self.pacs.label}) stopped")
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"gave up after {self.opts.timeout:g} s {progress.waiting_for or 'waiting for the node'}"
                    )
                time.sleep(0.2)
        finally:
            if status is not None:
                status.stop()
            engine.dispose()
        self.result.update(
            series_uid=series_uid, seg_uid=progress.seg_uid, outputs=progress.outputs, delivered=progress.delivered
        )

    def _show(self, s: Step) -> None:
        style = ""
        if s.key.startswith("delivered"):
            style = "bold green"
        elif s.key.endswith(".built"):
            style = "bold"
        self.say(s.text, at=self.elapsed(s.at), took=s.took, style=style)

    def _confirm_in_pacs(self) -> None:
        """Ask the PACS itself (Orthanc's REST API, or the SCP's files) what it holds now."""
        from node.demo.steps import kinds

        expected = sum(self.result.get("delivered", {}).values())
        deadline = time.monotonic() + 30
        holds: Any = None
        err = ""
        while True:
            try:
                holds = self.pacs.holds()
            except OSError as e:
                holds, err = None, str(e)
            if holds is not None and sum(holds.values()) >= expected:
                break
            if time.monotonic() > deadline:
                got = kinds(holds) or "nothing" if holds is not None else f"no answer: {err}"
                raise DemoError(
                    f"{self.pacs.label} does not hold the {expected} instances delivered to it 30 s later "
                    f"(it holds {got})"
                )
            time.sleep(0.3)
        missing = {"SEG", "SC"} - {pacs_mod.short_name(c) for c in holds}
        if missing:
            raise DemoError(f"{self.pacs.label} holds {kinds(holds)}, but no {' and no '.join(sorted(missing))}")

        at = self.elapsed(dt.datetime.now(dt.UTC))
        source = "asked through its REST API" if self.pacs.kind == "orthanc" else "read from its files"
        self.say(f"{self.pacs.label} holds {kinds(holds)} ({source})", at=at, style="bold green")
        by_kind: dict[str, int] = {}
        for c, n in holds.items():
            by_kind[pacs_mod.short_name(c)] = by_kind.get(pacs_mod.short_name(c), 0) + n
        self.result["pacs_holds"] = by_kind

    def _dashboard_answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['web_port']}/healthz", timeout=2):
                return True
        except Exception:
            return False

    def _where_to_look(self) -> None:
        cfg = shown(self.config_path)
        running = self.opts.keep_running
        self.out.print()
        self.out.print(
            "[bold]Where to look[/]" + ("" if running else " (the demo's servers are stopped now; the files stay)"),
            highlight=False,
        )
        rows: list[tuple[str, str]] = []
        for label, where in self.pacs.where():
            rows.append(
                (
                    label,
                    where
                    if label != "Orthanc Explorer" or running
                    else f"{where} (start it again with: {self.pacs.binary} {shown(self.pacs.root / 'orthanc.json')})",
                )
            )
        dash = f"http://127.0.0.1:{self.ports['web_port']}/login?token={self.token}"
        if running and not self._dashboard_answers():
            dash += "  (not answering yet; see the node log)"
        rows += [
            ("dashboard", dash if running else f"{dash} (while the node runs: dicom-node run --config {cfg})"),
            ("node data", shown(self.root / "node-data")),
            ("node log", shown(self.node_log)),
            ("node config", cfg),
            ("what the node holds", f"dicom-node status --config {cfg}"),
        ]
        if self.result.get("seg_uid"):
            rows.append(("the SEG's lineage", f"dicom-node lineage {self.result['seg_uid']} --config {cfg}"))
        rows += [
            ("why the rule matched", f"dicom-node rules explain {self.result['series_uid']} --config {cfg}"),
            ("the forward queue", f"dicom-node queue --config {cfg}"),
            ("this run, with timings", shown(self.root / "demo-summary.json")),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            self.out.print(f"  {k:<{width}}  {v}", highlight=False, markup=False, soft_wrap=True)

    def _write_summary(self, ok: bool, error: str = "") -> None:
        data = {
            "ok": ok,
            "error": error,
            "data_dir": str(self.root),
            "config": str(self.config_path),
            "node_log": str(self.node_log),
            "pacs": {"kind": getattr(self.pacs, "kind", ""), "storage": str(getattr(self.pacs, "storage", ""))},
            "ports": self.ports,
            "steps": [{"elapsed": at, "took": took, "step": text} for at, took, text in self.steps],
            **self.result,
        }
        (self.root / "demo-summary.json").write_text(json.dumps(data, indent=2) + "\n")

    def _wait_for_ctrl_c(self) -> None:
        self.out.print()
        self.out.print(
            "[bold]The node, the PACS and the dashboard keep running: press Ctrl-C to stop them.[/]", highlight=False
        )
        while True:
            time.sleep(1.0)
            if self.node is not None and self.node.proc is not None and self.node.proc.poll() is not None:
                raise DemoError(f"the node exited with status {self.node.proc.returncode}")
            if not self.pacs.alive():
                raise DemoError(f"the PACS ({self.pacs.label}) stopped")

    # --- stopping --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the node first (it may be sending to the PACS), then the PACS; each at most ~30 s."""
        # A second Ctrl-C must not leave the PACS running behind the node.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._stop()
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop(self) -> None:
        running = [
            what
            for what, up in (
                ("the node", self.node is not None and self.node.alive()),
                ("the PACS", self.pacs is not None and self.pacs.alive()),
            )
            if up
        ]
        if running:
            self.out.print(f"stopping {' and '.join(running)}", highlight=False)
        if self.node is not None:
            self.node.stop(30)
        if self.pacs is not None:
            with suppress(Exception):
                self.pacs.stop()

    def fail(self, message: str) -> None:
        self.out.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
        logs = [("node log", self.node_log)]
        if self.pacs is not None:
            logs.append(("PACS log", self.pacs.log_path))
        for label, p in logs:
            if p.exists():
                self.out.print(f"  {label}: {shown(p)}", highlight=False, markup=False)
        if self.node_log.exists():
            tail = self.node_log.read_text(errors="replace").splitlines()[-12:]
            if tail:
                self.out.print("  last lines of the node log:", highlight=False)
                for line in tail:
                    self.out.print(f"    {line}", highlight=False, markup=False, soft_wrap=True)
        with suppress(OSError):
            if self.root.is_dir():
                self._write_summary(ok=False, error=message)
