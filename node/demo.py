"""``dicom-node demo``: placeholder, being written (issue 6)."""

from __future__ import annotations

import typer


def demo() -> None:
    """Run the node with a local downstream PACS, send a bundled real CT series and show each step."""
    raise typer.Exit(1)
