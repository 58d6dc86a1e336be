"""The ``dicom-node`` command line."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Start-up time: ``dicom-node --help`` imports only typer and rich. Each command imports what it uses
# (the config, the database layer, the DICOM stack) inside its function; commands that only read the
# index load the config without compiling the rules, so they never import plugin code
# (scripts/bench/bench_cli_startup.py measures it, tests/e2e/test_cli_startup.py pins which modules load).
if TYPE_CHECKING:
    from sqlalchemy import Engine

    from node.config import Config
    from node.send.scu import SendSummary

from node import __version__

# Help is plain text, printed as written: with Rich markup, config names such as [retention] or
# [[web.users]] in a docstring would be read as style tags and vanish. Sub-apps inherit the mode.
app = typer.Typer(
    help="dicom-node: receive, index, derive and forward DICOM.",
    rich_markup_mode=None,
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Piped stderr (logs, cron) keeps each message on one line, so paths can be copied from it.
console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
# Piped output (logs, scripts, tests) gets wide lines instead of truncated names.
out = Console() if sys.stdout.isatty() else Console(width=200)


def _fail(message: str, code: int = 1) -> NoReturn:
    """End the command with ``error: <message>`` on stderr and exit status ``code`` (2: the command line is wrong)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code) from None


ConfigOption = typer.Option(None, "--config", "-c", help="TOML config file (default: config/node.toml if present).")


def _load(config: Path | None) -> Config:
    """The config with its rules compiled (plugins discovered and imported); an error exits 2."""
    from node.config import ConfigError
    from node.decide.compile import load_checked_config

    try:
        return load_checked_config(config)
    except ConfigError as e:
        _fail(str(e), 2)


def _settings(config: Path | None) -> Config:
    """The config without its rules: for commands that only read or change the index.

    Compiling the rules imports every plugin a rule names; ``status``, ``queue``, ``jobs`` must answer
    an on-call admin even where a local plugin's module cannot be imported (or a rule is wrong).
    """
    from node.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as e:
        _fail(str(e), 2)


def _version(value: bool) -> None:
    if value:
        out.print(f"dicom-node {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


@app.command()
def run(
    config: Path | None = ConfigOption,
    receiver_of: int | None = typer.Option(
        None, "--receiver-of", hidden=True, help="Run as a receiver process of this node process ([node] processes)."
    ),
    notify_fd: int = typer.Option(-1, "--notify-fd", hidden=True, help="A receiver's pipe to its node process."),
) -> None:
    """Run the node in the foreground until SIGINT/SIGTERM."""
    link = None
    if receiver_of is not None:  # started by the node itself (node.app.Receivers), not by hand
        from node.app import ParentLink

        link = ParentLink(receiver_of, notify_fd)  # first: it must not outlive a parent that dies meanwhile
    cfg = _load(config)
    from node.app import Node
    from node.index.cluster import RECEIVER
    from node.logs import setup_logging

    setup_logging(cfg.logging.level, cfg.logging.json_format, redact_phi=cfg.logging.redact_phi)
    if link is not None:
        link.tag_logs()
    try:
        if link is not None:
            Node(cfg, role=RECEIVER, parent=link).run_forever()
        else:
            Node(cfg, config_path=config).run_forever()
    except OSError as e:
        _fail(f"cannot start: {e}")


@app.command()
def echo(
    host: str,
    port: int,
    called_ae: str = typer.Option("ANY-SCP", "--aec", help="Called AE title."),
    calling_ae: str = typer.Option("DICOM_NODE", "--aet", help="Our (calling) AE title."),
    timeout: float = typer.Option(10.0, help="Seconds to wait for each step."),
) -> None:
    """Verify a peer with C-ECHO."""
    from node.send.scu import Peer
    from node.send.scu import echo as do_echo

    try:
        status = do_echo(Peer(host, port, called_ae=called_ae, calling_ae=calling_ae, timeout=timeout))
    except ConnectionError as e:
        console.print(f"[bold red]C-ECHO failed:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    out.print(f"C-ECHO {called_ae}@{host}:{port}: status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@app.command()
def send(
    host: str,
    port: int,
    paths: list[Path] = typer.Argument(..., help="Files or folders (searched recursively)."),
    called_ae: str = typer.Option("ANY-SCP", "--aec", help="Called AE title."),
    calling_ae: str = typer.Option("DICOM_NODE", "--aet", help="Our (calling) AE title."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for each step."),
    transfer_syntax: str = typer.Option(
        "as-stored",
        "--transfer-syntax",
        help="as-stored (decompressed only if the peer refuses it), none (uncompressed), or lossless jpeg2000 / rle.",
    ),
    attempts: int = typer.Option(1, "--attempts", min=1, help="Tries for instances that fail transiently."),
) -> None:
    """Send files with C-STORE (the forwarder's sender), with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from node.dicom.files import iter_files
    from node.send.scu import Peer, send_files
    from node.send.transcode import PREFERRED

    if transfer_syntax not in PREFERRED:
        _fail(f"--transfer-syntax must be one of {', '.join(PREFERRED)}", 2)

    files = iter_files(paths)
    missing = [p for p in paths if not p.exists()]
    if missing:
        _fail(f"no such file or folder: {', '.join(map(str, missing))}", 2)
    with Progress(
        TextColumn("[bold]sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("send", total=len(files))
        peer = Peer(
            host, port, called_ae=called_ae, calling_ae=calling_ae, timeout=timeout, transfer_syntax=transfer_syntax
        )
        summary = send_files(peer, files, progress=lambda _p, _s: bar.advance(task), attempts=attempts)
    t = Table(title=f"C-STORE to {called_ae}@{host}:{port}")
    t.add_column("status")
    t.add_column("instances", justify="right")
    for status, n in sorted(summary.statuses.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        t.add_row("no response" if status is None else f"0x{status:04X}", str(n))
    out.print(t)
    for path, err in (summary.errors + summary.skipped)[:20]:
        console.print(f"  {path}: {err}", highlight=False, markup=False)
    for path in summary.dicomdirs[:20]:
        console.print(
            f"  {path}: a DICOMDIR (an index of the files, not an instance): not sent", highlight=False, markup=False
        )
    out.print(f"{summary.sent} sent, {summary.failed} failed{_skipped_text(summary)}", highlight=False)
    if not files or summary.sent + summary.failed == 0:
        _fail("no DICOM instances to send in the given paths")
    # Files left out on purpose are said above; the exit status is about what was sent.
    raise typer.Exit(0 if summary.failed == 0 else 1)


def _skipped_text(summary: SendSummary) -> str:
    """``; skipped 1 DICOMDIR, 2 non-DICOM files`` (empty when nothing was left out)."""
    parts = []
    if summary.dicomdirs:
        parts.append(f"{len(summary.dicomdirs)} DICOMDIR{'s' if len(summary.dicomdirs) > 1 else ''}")
    if summary.skipped:
        parts.append(f"{len(summary.skipped)} non-DICOM file{'s' if len(summary.skipped) > 1 else ''}")
    return f"; skipped {', '.join(parts)}" if parts else ""


@app.command()
def status(config: Path | None = ConfigOption) -> None:
    """What the index holds: counts by patient, study and series, and disk use."""
    import shutil

    from node.index import read

    cfg = _settings(config)
    with _index(cfg) as engine:
        try:
            s = read.summary(engine)
            recent = read.series(engine, limit=10).items
            procs = read.node_processes(engine)
        except Exception as e:  # unreachable or unmigrated database
            _fail(f"cannot read the index at {cfg.database_url}: {e}")
    free = shutil.disk_usage(cfg.data_dir).free if cfg.data_dir.exists() else 0
    out.print(f"data directory: {cfg.data_dir}")
    now = datetime.now(UTC)
    for p in procs:
        if p.alive(now):
            state = f"alive, heartbeat {(now - p.heartbeat_at).total_seconds():.0f} s ago"
        else:
            state = f"gone since {p.expires_at:%Y-%m-%d %H:%M:%S} UTC (its work is taken over)"
        out.print(f"node process {p.id} ({p.role}, pid {p.pid}, since {p.started_at:%Y-%m-%d %H:%M:%S} UTC): {state}")
    out.print(
        f"patients: {s.patients}  studies: {s.studies}  series: {s.series}  instances: {s.instances}  "
        f"stored: {s.stored_bytes / 1e9:.2f} GB  disk free: {free / 1e9:.1f} GB"
    )
    series_states = {k: v for k, v in s.states.series.items() if v}
    job_states = {k: v for k, v in s.states.jobs.items() if v}
    if series_states:
        out.print("series: " + "  ".join(f"{k}: {v}" for k, v in sorted(series_states.items())))
    out.print("jobs: " + ("  ".join(f"{k}: {v}" for k, v in sorted(job_states.items())) or "none"))
    for dest, states in sorted(s.states.deliveries.items()):
        out.print(f"deliveries to {dest}: " + "  ".join(f"{k}: {v}" for k, v in sorted(states.items())))
    if recent:
        t = Table(title="most recent series")
        for col in ("patient", "study date", "modality", "series", "instances", "last received (UTC)"):
            t.add_column(col)
        for r in recent:
            last = r.last_received_at.strftime("%Y-%m-%d %H:%M:%S") if r.last_received_at else "-"
            t.add_row(r.patient_name, r.study_date, r.modality, r.series_description, str(r.instance_count), last)
        out.print(t)


plugins_app = typer.Typer(
    help="List the installed plugins; run one on files (plugins run); start a plugin package (plugins new).",
    invoke_without_command=True,
)
app.add_typer(plugins_app, name="plugins")


@plugins_app.callback()
def plugins(
    ctx: typer.Context,
    config: Path | None = ConfigOption,
    schema: bool = typer.Option(False, "--schema", help="Print each plugin's full parameter JSON schema."),
) -> None:
    """Without a sub-command: list installed plugins: name, version, where they come from, and their parameters."""
    if ctx.invoked_subcommand is not None:
        return
    import json

    from node.plugins.registry import PluginLoadError, describe, discover

    cfg = _load(config)
    found = discover(cfg.plugins)
    if not found:
        out.print("no plugins installed")
        return
    failed = False
    for name, ref in sorted(found.items()):
        if ref.kind == "command":
            origin = "config [plugins.commands]"
        elif ref.source == "config":
            origin = "config [plugins.local]"
        else:
            origin = f"package {ref.source} {ref.version}".strip()
        if ref.environment:
            env = cfg.plugins.environments[ref.environment]
            origin += f", environment {ref.environment} ({env.python})"
        try:
            info = describe(ref, cfg.plugins)
        except PluginLoadError as e:
            failed = True
            out.print(f"{name}: cannot be loaded ({origin}, {ref.target}): {e}", highlight=False, markup=False)
            continue
        out.print(f"{name} {info.version} -- {info.description or 'no description'}", highlight=False, markup=False)
        out.print(f"    from {origin} ({ref.target})", highlight=False, markup=False)
        if ref.kind == "command":
            cmd = cfg.plugins.commands[name]
            runs = f"{cmd.runtime} image {cmd.container}" if cmd.container else "command"
            out.print(f"    runs: {runs} {' '.join(cmd.command or [])}".rstrip(), highlight=False, markup=False)
        if info.gpu != "none":
            out.print(f"    GPU: {info.gpu}", highlight=False, markup=False)
        sch = dict(info.schema)
        if schema:
            out.print(json.dumps(sch, indent=2), highlight=False, markup=False)
            continue
        props = sch.get("properties", {})
        if not props:
            out.print("    parameters: none", highlight=False)
        for key, p in props.items():
            kind = p.get("type") or " | ".join(x.get("type", "?") for x in p.get("anyOf", [])) or "object"
            if "default" in p:
                default = f" = {json.dumps(p['default'])}"
            else:
                default = " (required)" if key in sch.get("required", []) else " (optional, has a default)"
            out.print(f"    {key}: {kind}{default}", highlight=False, markup=False)
    if failed:
        raise typer.Exit(1)


@plugins_app.command("run")
def plugins_run(
    name: str = typer.Argument(..., help="The plugin, or a chain NAME,NAME2 (each sees the results before it)."),
    paths: list[Path] = typer.Argument(..., help="DICOM files or folders (searched recursively); one run per series."),
    params: str | None = typer.Option(
        None, "--params", help='Parameters as JSON, e.g. {"lower": 200}; for a chain a list, one object per plugin.'
    ),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Folder for the outputs: one sub-folder per source series, named by its UID."
    ),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds per series (default: [plugins] timeout)."),
    study: bool = typer.Option(
        False, "--study", help="One run per study, its series as named inputs (series-<number>), as a study rule."
    ),
    primary: str | None = typer.Option(None, "--primary", help="With --study: the input the outputs are built on."),
    priors: list[Path] = typer.Option(
        [], "--prior", help="Files or folders of a prior study of the patient (repeatable): the plugin's priors."
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Run a plugin on files as a node job runs it, without a node: for plugin authors.

    Each series runs in a plugin process of its own, under the timeout and memory limit of [plugins],
    and its outputs are built, repaired and validated as the node does before they are written. Prints
    each output's kind and file, and where the time went. Nothing is indexed or sent; no node needs to
    run. Exit status 1 when a series failed (what was built before the failure is still written).
    """
    from node.plugins import offline

    missing = [p for p in [*paths, *priors] if not p.exists()]
    if missing:
        _fail(f"no such file or folder: {', '.join(map(str, missing))}", 2)
    if primary is not None and not study:
        _fail("--primary names an input of a study: give --study too", 2)
    cfg = _settings(config)
    chain = [n.strip() for n in name.split(",") if n.strip()]
    try:
        values = offline.parse_params(params, chain)
    except offline.OfflineError as e:
        _fail(str(e), 2)
    series, skipped = offline.group_series(paths, outputs=out_dir)
    prior_series, prior_skipped = offline.group_series(priors, outputs=out_dir) if priors else ([], [])
    for path, why in [*skipped, *prior_skipped][:20]:
        console.print(f"  skipped {path}: {why}", highlight=False, markup=False)
    if len(skipped) + len(prior_skipped) > 20:
        more = len(skipped) + len(prior_skipped) - 20
        console.print(f"  ... and {more} more files skipped", highlight=False, markup=False)
    failed = 0
    try:
        units = offline.runs(series, study=study, primary=primary)
        found = offline.prior_studies(prior_series)
        if priors and not found:
            _fail("no DICOM series in the --prior paths")
        for done in offline.run(cfg, chain, units, values, out_dir, timeout=timeout, priors=found):
            ran = ", ".join(done.result.plugins) if done.result and done.result.plugins else " then ".join(chain)
            _lines([f"{done.unit.label()}: {ran}"])
            _lines([f"  {o.kind:<6} {o.file}  ({o.sop_class})" for o in done.outputs])
            _lines([f"  log    {log}  (what the command printed)" for log in done.logs])
            if done.result is not None and not done.outputs and done.ok:
                _lines(["  no output (the plugin returned none)"])
            _lines([f"  note: {n}" for n in (done.result.notes if done.result else [])])
            _lines([f"  time: {offline.timing_line(done)}"])
            if not done.ok:
                failed += 1
                console.print(f"  [bold red]failed:[/] {escape(done.error)}", highlight=False)
    except offline.OfflineError as e:
        _fail(str(e))
    if failed:
        _fail(f"{failed} of {len(units)} {'studies' if study else 'series'} failed (see above)")


@plugins_app.command("new")
def plugins_new(
    name: str = typer.Argument(..., help="The plugin's name as rules write it: lowercase letters, digits, hyphens."),
    folder: Path | None = typer.Argument(None, help="Where the package goes (default: ./NAME); new or empty."),
) -> None:
    """Start a plugin package that installs and passes its own test as it is.

    It has a pyproject.toml with the dicom_node.plugins entry point, a threshold segmentation plugin
    with a parameters model, a test that runs it on a small generated series, and a README with the
    next steps (pip install -e, pytest, dicom-node plugins run).
    """
    from node.plugins.scaffold import ScaffoldError, scaffold

    target = folder if folder is not None else Path(name)
    try:
        made = scaffold(name, target)
    except ScaffoldError as e:
        _fail(str(e), 2)
    _lines([f"created {p}" for p in made.files])
    _lines(["", "next:", *(f"  {step}" for step in made.next_steps)])


rules_app = typer.Typer(help="Check rules and see what they do (nothing here changes the index).", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
jobs_app = typer.Typer(help="List, inspect, retry and cancel jobs.", invoke_without_command=True)
app.add_typer(jobs_app, name="jobs")
queue_app = typer.Typer(
    help="The forward queue: what waits for which destination; retry and cancel deliveries.",
    invoke_without_command=True,
)
app.add_typer(queue_app, name="queue")


def _engine(cfg: Config, write: bool = False) -> Engine:
    from node.index.db import NoIndex, existing_engine

    try:
        return existing_engine(cfg.database_url, write=write)
    except NoIndex as e:
        _fail(str(e))


@contextlib.contextmanager
def _index(cfg: Config, write: bool = False) -> Iterator[Engine]:
    """The index's engine for one command, disposed of when the command is done with it."""
    engine = _engine(cfg, write)
    try:
        yield engine
    finally:
        engine.dispose()


def _check_state(state: str | None, states: type[StrEnum]) -> None:
    """A ``--state`` given must be one of ``states`` (exit 2, naming them, if not)."""
    if state is not None and state not in list(states):
        _fail(f"--state must be one of {', '.join(states)}", 2)


def _lines(lines: list[str]) -> None:
    for line in lines:
        out.print(line, highlight=False, markup=False)


@rules_app.command("check")
def rules_check(config: Path | None = ConfigOption) -> None:
    """Validate the config and its rules; list the rules in evaluation order."""
    cfg = _load(config)
    out.print(f"{cfg.source}: configuration valid, {len(cfg.ruleset)} rule(s)", highlight=False)
    for n, rule in enumerate(cfg.ruleset, 1):
        m = rule.model
        flags = [f"priority {m.priority}"] + (["disabled"] if not m.enabled else []) + (["stop"] if m.stop else [])
        if m.stable_after is not None:
            flags.append(f"stable_after {m.stable_after:g} s")
        if m.expected_instances is not None:
            flags.append(f"expected_instances {m.expected_instances}")
        flags.append(f"on_revision {m.on_revision}")
        _lines(
            [
                f"  {n}. {rule.name} ({', '.join(flags)})",
                *[f"     {line}" for line in rule.describe()],
                *[f"     then {a.summary()}" for a in m.actions],
            ]
        )
    from node.plugins.gpus import gpu_warnings
    from node.plugins.runtime import memory_limit_warnings

    for warning in [*memory_limit_warnings(cfg), *gpu_warnings(cfg)]:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)


@rules_app.command("explain")
def rules_explain(
    series_uid: str = typer.Argument(..., help="Series Instance UID (or a unique prefix)."),
    config: Path | None = ConfigOption,
) -> None:
    """For a series in the index: each rule, matched or not, and the first condition that failed."""
    cfg = _load(config)
    from node.decide.explain import explain_series

    with _index(cfg) as engine:
        try:
            _lines(explain_series(engine, cfg.data_dir, cfg.ruleset, series_uid))
        except LookupError as e:
            _fail(str(e.args[0]))


@rules_app.command("test")
def rules_test(
    paths: list[Path] = typer.Argument(..., help="DICOM files or folders (searched recursively)."),
    calling_ae: str = typer.Option("", "--calling-ae", help="Pretend the files came from this AE title."),
    called_ae: str = typer.Option("", "--called-ae", help="Pretend the sender called this AE title."),
    config: Path | None = ConfigOption,
) -> None:
    """Dry run on files: what the rules would do with each series, without storing anything."""
    cfg = _load(config)
    from node.decide.explain import dry_run_files
    from node.decide.facts import series_from_files
    from node.dicom.files import iter_files

    missing = [p for p in paths if not p.exists()]
    if missing:
        _fail(f"no such file or folder: {', '.join(map(str, missing))}", 2)
    groups, bad = series_from_files(iter_files(paths))
    _lines(dry_run_files(cfg.ruleset, groups, calling_ae, called_ae))
    for p, why in bad[:20]:
        console.print(f"  skipped {p}: {why}", highlight=False, markup=False)
    if not groups:
        _fail("no readable DICOM series in the given paths")


def _parse_when(value: str, option: str, end_of_day: bool = False) -> datetime:
    """A date or date-time in UTC; a bare date given as an end means the end of that day."""
    try:
        when = datetime.fromisoformat(value)
        if end_of_day and len(value.strip()) == 10:
            when = when.replace(hour=23, minute=59, second=59, microsecond=999999)
    except ValueError:
        _fail(
            f"{option} {value!r}: use a date or date-time such as 2026-11-20 or "
            "2026-11-20T08:00 (UTC unless an offset is given)",
            2,
        )
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@rules_app.command("replay")
def rules_replay(
    since: str = typer.Option(..., "--since", help="Series last received at or after this date/time (UTC)."),
    until: str | None = typer.Option(None, "--until", help="... and at or before this one."),
    config: Path | None = ConfigOption,
) -> None:
    """Dry run over the index: what the current rules would fire for past series (no jobs are made)."""
    cfg = _load(config)
    from node.decide.explain import replay

    start = _parse_when(since, "--since")
    end = _parse_when(until, "--until", end_of_day=True) if until else None
    with _index(cfg) as engine:
        lines, fired = replay(engine, cfg.data_dir, cfg.ruleset, start, end)
    _lines(lines)
    total = sum(fired.values()) - fired.get("(no rule)", 0) - fired.get("(unreadable)", 0)
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(fired.items())) or "no series in that period"
    period = f"since {start:%Y-%m-%d %H:%M} UTC" + (f" until {end:%Y-%m-%d %H:%M} UTC" if end else "")
    out.print(f"{total} rule match(es) over the series received {period} ({summary})", highlight=False)


@jobs_app.callback()
def jobs_list(
    ctx: typer.Context,
    state: str | None = typer.Option(None, "--state", help="Only jobs in this state."),
    limit: int = typer.Option(50, "--limit", help="At most this many (newest first)."),
    config: Path | None = ConfigOption,
) -> None:
    """Without a sub-command: list jobs, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    from node.index import read
    from node.index.states import JobState

    _check_state(state, JobState)
    cfg = _settings(config)
    with _index(cfg) as engine:
        rows = read.jobs(engine, state=state or "", limit=limit).items
    t = Table(title=f"jobs{f' ({state})' if state else ''}")
    for col in ("id", "state", "rule", "action", "series", "rev", "attempts", "created (UTC)", "result / error"):
        t.add_column(col)
    for j in rows:
        t.add_row(
            str(j.id),
            j.state,
            j.rule,
            f"{j.action_index}: {j.kind}",
            f"{j.modality} {j.series_instance_uid}",
            str(j.revision),
            f"{j.attempts}/{j.max_attempts}",
            j.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.created_at else "-",
            j.detail,
        )
    out.print(t)


@jobs_app.command("show")
def jobs_show(job_id: int, config: Path | None = ConfigOption) -> None:
    """Everything about one job."""
    import json

    from node.index import read

    cfg = _settings(config)
    with _index(cfg) as engine:
        j = read.job(engine, job_id)
    if j is None:
        _fail(f"there is no job {job_id}")
    rows = [
        ("job", str(j.id)),
        ("state", j.state),
        ("rule", j.rule),
        ("action", f"{j.action_index}: {json.dumps(json.loads(j.action))}"),
        ("series", f'{j.series_instance_uid} ({j.modality} "{j.series_description}")'),
        ("revision", str(j.revision)),
        ("run", str(j.run) + (" (a rerun: dicom-node lineage shows every run)" if j.run > 1 else "")),
        ("priority", str(j.priority)),
        ("attempts", f"{j.attempts} of {j.max_attempts}"),
        ("created", str(j.created_at)),
        ("not before", str(j.not_before)),
        ("started", str(j.started_at or "-")),
        ("finished", str(j.finished_at or "-")),
        ("result", j.result or "-"),
        ("last error", j.last_error or "-"),
    ]
    _lines([f"{k:>11}: {v}" for k, v in rows])


@jobs_app.command("retry")
def jobs_retry(job_id: int, config: Path | None = ConfigOption) -> None:
    """Run a failed or cancelled job again (the running node picks it up within seconds)."""
    from node.jobs.store import JobStateError, retry

    cfg = _settings(config)
    with _index(cfg, write=True) as engine:
        try:
            retry(engine, job_id)
        except JobStateError as e:
            _fail(str(e))
    out.print(f"job {job_id} is pending again")


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, config: Path | None = ConfigOption) -> None:
    """Cancel a pending or running job (a running one stops at its next step)."""
    from node.jobs.store import JobStateError, cancel

    cfg = _settings(config)
    with _index(cfg, write=True) as engine:
        try:
            was = cancel(engine, job_id)
        except JobStateError as e:
            _fail(str(e))
    out.print(f"job {job_id} cancelled (it was {was})")


# -- operator actions: run a job or a series' rules again, forward a series (node.web.actions does the same) --


@jobs_app.command("rerun")
def jobs_rerun(job_id: int, config: Path | None = ConfigOption) -> None:
    """Run a finished job (succeeded, failed or cancelled) again as a new job; a plugin's new outputs get new UIDs.

    The earlier job and its outputs stay; the running node picks the new job up within seconds.
    """
    from node.jobs.store import JobStateError, rerun

    cfg = _settings(config)
    with _index(cfg, write=True) as engine:
        try:
            new = rerun(engine, job_id)
        except JobStateError as e:
            _fail(str(e))
    out.print(f"job {job_id} runs again as job {new}")


series_app = typer.Typer(help="Act on a stored series: run its rules again, forward it.", no_args_is_help=True)
app.add_typer(series_app, name="series")


@series_app.command("rerun-rules")
def series_rerun_rules(
    series_uid: str = typer.Argument(..., help="Series Instance UID."), config: Path | None = ConfigOption
) -> None:
    """Evaluate the current rules on the series' latest stable revision and make the matching rules' jobs again.

    Each job is the next run of its rule and action: the earlier jobs and their outputs stay.
    """
    from node.decide.rerun import RerunRefused, rerun_rules

    cfg = _load(config)
    assert cfg.ruleset is not None
    with _index(cfg, write=True) as engine:
        try:
            done = rerun_rules(engine, cfg.data_dir, cfg.ruleset, series_uid, actor="cli")
        except RerunRefused as e:
            _fail(str(e.args[0]))
    out.print(done.message(), highlight=False, markup=False)


@series_app.command("forward")
def series_forward(
    series_uid: str = typer.Argument(..., help="Series Instance UID."),
    destination: str = typer.Argument(..., help="A configured destination's name."),
    config: Path | None = ConfigOption,
) -> None:
    """Queue the series' stored instances for a destination now (instances it received before are sent again)."""
    from node.send.queue import forward_series

    cfg = _settings(config)
    known = [d.name for d in cfg.destinations]
    if destination not in known:
        _fail(f"no destination {destination!r} in {cfg.source} (destinations: {', '.join(known) or 'none'})", 2)
    with _index(cfg, write=True) as engine:
        try:
            got = forward_series(engine, series_uid, destination)
        except LookupError as e:
            _fail(str(e.args[0]))
    waiting = f"; {got.already} already waiting to be sent" if got.already else ""
    out.print(f"{got.new + got.requeued} instance(s) queued for {destination}{waiting}", highlight=False)


@app.command()
def lineage(
    uid: str = typer.Argument(..., help="A SOP Instance UID or Series Instance UID (a source or an output)."),
    plugin_version: str = typer.Option(
        "",
        "--plugin-version",
        help='Only jobs made with this plugin version: "1.2", "NAME 1.2" or "NAME==1.2".',
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Where an object came from and went: source series, revisions, jobs (plugin versions), outputs, deliveries."""
    from node.index.lineage import NotFound
    from node.index.lineage import lineage as chain

    cfg = _settings(config)
    with _index(cfg) as engine:
        try:
            lines = chain(engine, uid, plugin_version)
        except NotFound as e:
            _fail(str(e))
    _lines(lines)


@app.command("seg-template")
def seg_template(
    seg_file: Path = typer.Argument(..., help="A DICOM Segmentation file."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the JSON here (default: standard output)."),
) -> None:
    """Write a SEG's segments as a dcmqi metainfo.json (usable as a rule's segment_template)."""
    import json

    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.derive.template import export_template

    try:
        ds = dcmread(seg_file, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as e:
        _fail(f"cannot read {seg_file}: {e}")
    if "SegmentSequence" not in ds:
        _fail(f"{seg_file} is not a Segmentation (it has no Segment Sequence)")
    text = json.dumps(export_template(ds), indent=2) + "\n"
    if output is None:
        out.print(text, end="", highlight=False, markup=False, soft_wrap=True)
    else:
        output.write_text(text)
        console.print(f"wrote {output} ({len(ds.SegmentSequence)} segments)", highlight=False, markup=False)


DestinationOption = typer.Option(None, "--destination", "-d", help="Only deliveries to this destination.")
SeriesOption = typer.Option(None, "--series", help="Only deliveries of this series (Series Instance UID).")
IdsOption = typer.Option(None, "--id", help="Only this delivery (repeatable).")


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    delta = (value - datetime.now(UTC)).total_seconds()
    at = value.strftime("%Y-%m-%d %H:%M:%S")
    return f"{at} (in {delta:.0f} s)" if delta > 0 else f"{at} (due)"


@queue_app.callback()
def queue_list(
    ctx: typer.Context,
    destination: str | None = DestinationOption,
    state: str | None = typer.Option(None, "--state", help="List the deliveries in this state, newest first."),
    series: str | None = SeriesOption,
    limit: int = typer.Option(50, "--limit", help="At most this many rows in a listing."),
    config: Path | None = ConfigOption,
) -> None:
    """Without a sub-command: deliveries by destination and state (with --state or --series: one row each)."""
    if ctx.invoked_subcommand is not None:
        return
    from node.index import read
    from node.index.states import DeliveryState

    _check_state(state, DeliveryState)
    cfg = _settings(config)
    summaries: list[read.DestinationQueue] = []
    with _index(cfg) as engine:
        if state is None and series is None:
            summaries = [s for s in read.destinations(engine) if destination in (None, s.destination)]
            rows = None
        else:
            query = read.DeliveryQuery(destination or "", state or "", series or "", limit)
            rows = read.deliveries(engine, query).items
    configured = {d.name: d for d in cfg.destinations}
    if rows is None:
        t = Table(title="forward queue")
        for col in (
            "destination",
            *DeliveryState,
            "oldest queued (UTC)",
            "next attempt (UTC)",
            "last error",
        ):
            t.add_column(col)
        for s in summaries:
            name = s.destination + ("" if s.destination in configured else " (not configured)")
            delivered = s.states.get(DeliveryState.DELIVERED, 0) + s.states.get(read.COMMITTED, 0)
            awaiting = s.states.get(read.AWAITING_COMMITMENT, 0)
            delivered_text = (
                f"{delivered + awaiting} ({awaiting} {read.AWAITING_COMMITMENT})" if awaiting else str(delivered)
            )
            t.add_row(
                name,
                str(s.states.get(DeliveryState.QUEUED, 0)),
                str(s.states.get(DeliveryState.SENDING, 0)),
                delivered_text,
                str(s.states.get(DeliveryState.FAILED, 0)),
                str(s.states.get(DeliveryState.CANCELLED, 0)),
                s.oldest_queued.strftime("%Y-%m-%d %H:%M:%S") if s.oldest_queued else "-",
                _when(s.next_attempt),
                s.last_error,
            )
        out.print(t)
        if not summaries:
            out.print("nothing was ever queued" + (f" for {destination}" if destination else ""))
        return
    t = Table(title="deliveries" + (f" ({state})" if state else ""))
    for col in (
        "id",
        "destination",
        "state",
        "attempts",
        "next attempt (UTC)",
        "status",
        "error / warning",
        "SOP Instance UID",
    ):
        t.add_column(col)
    for r in rows:
        t.add_row(
            str(r.id),
            r.destination,
            r.state_text,
            str(r.attempts),
            _when(r.next_attempt_at) if r.next_attempt_at else "-",
            "-" if r.last_status is None else f"0x{r.last_status:04X}",
            r.last_error or r.warning,
            r.sop_instance_uid,
        )
    out.print(t)


def _change_queue(
    config: Path | None,
    destination: str | None,
    series: str | None,
    ids: list[int] | None,
    everything: bool,
    change: Callable[[Any], str],
) -> None:
    """Run ``change(engine)`` on the index for retry/cancel, after checking that a selection was given."""
    if not (destination or series or ids or everything):
        _fail("say which deliveries: --destination, --series, --id, or --all", 2)
    cfg = _settings(config)
    with _index(cfg, write=True) as engine:
        message = change(engine)
    out.print(message)


@queue_app.command("retry")
def queue_retry(
    destination: str | None = DestinationOption,
    series: str | None = SeriesOption,
    ids: list[int] | None = IdsOption,
    everything: bool = typer.Option(False, "--all", help="Every failed or cancelled delivery."),
    config: Path | None = ConfigOption,
) -> None:
    """Send failed or cancelled deliveries again, and waiting ones now (the running node takes them within seconds)."""
    from node.send import queue

    def change(engine: Any) -> str:
        again = queue.retry(engine, destination=destination, ids=ids, series_uid=series)
        now = queue.retry_now(engine, destination) if not (series or ids) else 0
        return f"{again} failed or cancelled deliveries queued again; {now} waiting ones made due now"

    _change_queue(config, destination, series, ids, everything, change)


@queue_app.command("cancel")
def queue_cancel(
    destination: str | None = DestinationOption,
    series: str | None = SeriesOption,
    ids: list[int] | None = IdsOption,
    everything: bool = typer.Option(False, "--all", help="Every queued delivery."),
    config: Path | None = ConfigOption,
) -> None:
    """Cancel queued deliveries (one already on the wire may still arrive)."""
    from node.send import queue

    def change(engine: Any) -> str:
        n = queue.cancel(engine, destination=destination, ids=ids, series_uid=series)
        return f"{n} deliveries cancelled"

    _change_queue(config, destination, series, ids, everything, change)


@app.command()
def audit(
    kind: list[str] = typer.Option([], "--kind", "-k", help="Only these event kinds (repeat; see --kinds)."),
    uid: str | None = typer.Option(None, "--uid", help="Only events about this study, series or SOP Instance UID."),
    since: str | None = typer.Option(None, "--since", help="From this date/time (UTC)."),
    until: str | None = typer.Option(None, "--until", help="Up to this date/time (UTC)."),
    limit: int = typer.Option(100, "--limit", "-n", min=1, help="At most this many events, newest first."),
    kinds: bool = typer.Option(False, "--kinds", help="List the event kinds and what they mean."),
    config: Path | None = ConfigOption,
) -> None:
    """The append-only audit trail: who connected, what was stored, which rule fired, what was made and sent."""
    from node import audit as trail

    if kinds:
        _lines([f"{k:<22} {meaning}" for k, meaning in trail.KINDS.items()])
        return
    cfg = _settings(config)
    with _index(cfg) as engine:
        try:
            events = trail.query(
                engine,
                kind=kind or None,
                uid=uid,
                since=_parse_when(since, "--since") if since else None,
                until=_parse_when(until, "--until", end_of_day=True) if until else None,
                limit=limit,
            )
        except ValueError as e:
            _fail(str(e), 2)
    _lines([trail.format_event(e) for e in reversed(events)] or ["(no events)"])


@app.command()
def retention(
    config: Path | None = ConfigOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be deleted; change nothing."),
) -> None:
    """Run the clean-up once now ([retention] in the config): old series, the disk watermark, delivery history.

    Safe while the node runs: each series is checked again and deleted in its own transaction.
    """
    from node.logs import setup_logging
    from node.storage import Storage
    from node.storage.retention import Retention

    cfg = _settings(config)
    setup_logging(cfg.logging.level, cfg.logging.json_format, redact_phi=cfg.logging.redact_phi)
    reader = _engine(cfg)
    engine = _engine(cfg, write=True) if not dry_run else reader
    try:
        report = Retention(cfg, engine, Storage(cfg.data_dir), reader=reader).run_once(dry_run=dry_run)
    finally:
        engine.dispose()
        reader.dispose()
    _lines(report.lines())
    raise typer.Exit(1 if report.errors else 0)


web_app = typer.Typer(help="The dashboard and REST API.", no_args_is_help=True)
app.add_typer(web_app, name="web")


@web_app.command("hash-password")
def web_hash_password(
    password: str = typer.Option(
        ..., prompt=True, confirmation_prompt=True, hide_input=True, help="The password (asked for when not given)."
    ),
) -> None:
    """Print a password hash for a [[web.users]] entry (password_hash = "...")."""
    from node.web.auth import hash_password

    if len(password) < 8:
        _fail("use at least 8 characters", 2)
    out.print(hash_password(password), highlight=False, soft_wrap=True)


# The demo is a command of its own module (it starts a node, a PACS and a sender, and narrates).
from node.demo import demo as _demo  # noqa: E402

app.command("demo")(_demo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
