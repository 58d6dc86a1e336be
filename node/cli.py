"""The ``dicom-node`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from node import __version__
from node.config import Config, ConfigError, load_config

app = typer.Typer(
    help="dicom-node: receive, index, derive and forward DICOM.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)
# Piped output (logs, scripts, tests) gets wide lines instead of truncated names.
out = Console() if sys.stdout.isatty() else Console(width=200)

ConfigOption = typer.Option(None, "--config", "-c", help="TOML config file (default: config/node.toml if present).")


def _load(config: Path | None) -> Config:
    try:
        return load_config(config)
    except ConfigError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None


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
def run(config: Path | None = ConfigOption) -> None:
    """Run the node in the foreground until SIGINT/SIGTERM."""
    cfg = _load(config)
    from node.app import Node
    from node.logs import setup_logging

    setup_logging(cfg.logging.level, cfg.logging.json_format)
    try:
        Node(cfg).run_forever()
    except OSError as e:
        console.print(f"[bold red]error:[/] cannot start: {e}", highlight=False)
        raise typer.Exit(1) from None


@app.command()
def echo(
    host: str,
    port: int,
    called_ae: str = typer.Option("ANY-SCP", "--aec", help="Called AE title."),
    calling_ae: str = typer.Option("DICOM_NODE", "--aet", help="Our (calling) AE title."),
    timeout: float = typer.Option(10.0, help="Seconds to wait for each step."),
) -> None:
    """Verify a peer with C-ECHO."""
    from node.send.scu import echo as do_echo

    try:
        status = do_echo(host, port, called_ae=called_ae, calling_ae=calling_ae, timeout=timeout)
    except ConnectionError as e:
        console.print(f"[bold red]C-ECHO failed:[/] {e}", highlight=False)
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
) -> None:
    """Send files with C-STORE, as stored (no transcoding), with a progress bar."""
    from node.send.scu import iter_files, send_files

    files = iter_files(paths)
    missing = [p for p in paths if not p.exists()]
    if missing:
        console.print(f"[bold red]error:[/] no such file or folder: {', '.join(map(str, missing))}")
        raise typer.Exit(2)
    with Progress(
        TextColumn("[bold]sending"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=not console.is_terminal,
    ) as bar:  # fmt: skip
        task = bar.add_task("send", total=len(files))
        summary = send_files(
            host, port, files, called_ae=called_ae, calling_ae=calling_ae, timeout=timeout,
            progress=lambda _p, _s: bar.advance(task),
        )  # fmt: skip
    t = Table(title=f"C-STORE to {called_ae}@{host}:{port}")
    t.add_column("status")
    t.add_column("instances", justify="right")
    for status, n in sorted(summary.statuses.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        t.add_row("no response" if status is None else f"0x{status:04X}", str(n))
    if summary.skipped:
        t.add_row("skipped (not DICOM)", str(len(summary.skipped)))
    out.print(t)
    for path, err in (summary.errors + summary.skipped)[:20]:
        console.print(f"  {path}: {err}", highlight=False)
    out.print(f"{summary.sent} sent, {summary.failed} failed, {len(summary.skipped)} skipped")
    raise typer.Exit(0 if summary.ok else 1)


@app.command()
def status(config: Path | None = ConfigOption) -> None:
    """What the index holds: counts by patient, study and series, and disk use."""
    cfg = _load(config)
    from node.index.status import NoIndex, gather

    try:
        s = gather(cfg)
    except NoIndex as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    except Exception as e:  # unreachable or unmigrated database
        console.print(f"[bold red]error:[/] cannot read the index at {cfg.database_url}: {e}", highlight=False)
        raise typer.Exit(1) from None
    out.print(f"data directory: {cfg.data_dir}")
    out.print(
        f"patients: {s.patients}  studies: {s.studies}  series: {s.series}  instances: {s.instances}  "
        f"stored: {s.stored_bytes / 1e9:.2f} GB  disk free: {s.free_bytes / 1e9:.1f} GB"
    )
    if s.recent_series:
        t = Table(title="most recent series")
        for col in ("patient", "study date", "modality", "series", "instances", "last received (UTC)"):
            t.add_column(col)
        for r in s.recent_series:
            t.add_row(*[str(x) for x in r])
        out.print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
