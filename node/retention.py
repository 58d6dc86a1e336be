"""Scheduled clean-up by age and disk watermark: placeholder, being written (issue 6)."""

from __future__ import annotations

from pathlib import Path

import typer


def retention(
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML config file."),
) -> None:
    """Run the clean-up once now (placeholder)."""
    raise typer.Exit(1)
