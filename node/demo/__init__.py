"""``dicom-node demo``: the whole node in one command, on a real CT series, with each step shown as it happens.

It starts a downstream PACS (a private Orthanc when installed, else a small storage SCP of its
own), starts the node with a demo config (a rule that makes a SEG and Secondary Captures from every
CT series and sends them and the series to that PACS), sends the bundled CT series, and follows
the series through the node's index: received, stable, rule matched, each plugin job, the objects
built, the deliveries, and finally what the PACS holds. See docs/demo.md.

Only light imports here: the command line imports this module at start-up.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import typer

PACS_KINDS = ("auto", "orthanc", "builtin")


def demo(
    data_dir: Path = typer.Option(
        Path("var/demo"),
        "--data-dir",
        help="Folder for everything the demo makes (config, logs, the node's and the PACS's data).",
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="Delete an earlier demo run in --data-dir first (only a folder the demo made)."
    ),
    keep_running: bool = typer.Option(
        True,
        "--keep-running/--no-keep-running",
        help="Keep the node, the PACS and the dashboard running until Ctrl-C, to look "
        "around; --no-keep-running stops them once the results are in.",
    ),
    pacs: str = typer.Option(
        "auto",
        "--pacs",
        help="The downstream PACS: orthanc, builtin (a storage SCP in this process), or auto (Orthanc when installed).",
    ),
    node_port: int = typer.Option(0, "--node-port", min=0, max=65535, help="The node's DICOM port (0: a free one)."),
    web_port: int = typer.Option(0, "--web-port", min=0, max=65535, help="The dashboard's port (0: a free one)."),
    pacs_port: int = typer.Option(0, "--pacs-port", min=0, max=65535, help="The PACS's DICOM port (0: a free one)."),
    pacs_http_port: int = typer.Option(
        0, "--pacs-http-port", min=0, max=65535, help="Orthanc's HTTP port (0: a free one)."
    ),
    timeout: float = typer.Option(
        300.0, "--timeout", min=1, help="Seconds the series may take to get through before the demo gives up."
    ),
) -> None:
    """Run the node with a local downstream PACS, send a bundled real CT series and show each step."""
    from rich.console import Console
    from rich.markup import escape

    from node.demo.run import Demo, DemoError, Options
    from node.demo.workdir import WorkdirError

    # Piped output (logs, tests) gets whole lines instead of wrapped ones.
    out = Console(highlight=False) if sys.stdout.isatty() else Console(width=200, highlight=False, soft_wrap=True)
    if pacs not in PACS_KINDS:
        out.print(f"[bold red]error:[/] --pacs must be one of {', '.join(PACS_KINDS)}, not {escape(repr(pacs))}")
        raise typer.Exit(2)

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # stop the children on the way out, as Ctrl-C does

    previous = signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C stops the demo even when started from a shell that ignores SIGINT for background jobs.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    run = Demo(
        Options(
            data_dir=data_dir,
            fresh=fresh,
            keep_running=keep_running,
            pacs=pacs,
            node_port=node_port,
            web_port=web_port,
            pacs_port=pacs_port,
            pacs_http_port=pacs_http_port,
            timeout=timeout,
        ),
        out,
    )
    try:
        code = run.run()
    except WorkdirError as e:
        out.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    except DemoError as e:
        run.fail(str(e))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        out.print(f"stopped: the node and the PACS are shut down; the files stay in {run.root}", highlight=False)
        code = 0 if run.result.get("pacs_holds") else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    raise typer.Exit(code)
