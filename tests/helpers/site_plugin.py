"""A site's own plugin module in a folder, as an operator installs one for ``[plugins] paths``.

The source is the plugin docs/plugins.md opens with ("A plugin in 20 lines"), taken from the page so the
tests run what a reader copies; its version is set to :data:`VERSION` so a test can tell it by the
software it records.
"""

from __future__ import annotations

import re
from pathlib import Path

from helpers import REPO

#: The version the written plugin declares (the page's says 1.0).
VERSION = "7.3"


def docs_plugin_source() -> str:
    """The first Python block under "A plugin in 20 lines" in docs/plugins.md, with version :data:`VERSION`."""
    page = (REPO / "docs" / "plugins.md").read_text()
    found = re.search(r"^## A plugin in 20 lines\n.*?```python\n(.*?)```", page, re.S | re.M)
    assert found, 'docs/plugins.md has no "## A plugin in 20 lines" with a ```python block'
    source, n = re.subn(r'(@plugin\(name="bone", version=)"[^"]*"', rf'\1"{VERSION}"', found.group(1))
    assert n == 1, 'the plugin in docs/plugins.md no longer declares @plugin(name="bone", version=...)'
    return source


def write_site_plugin(folder: Path, package: str) -> str:
    """Writes the plugin as ``folder/package/bone.py`` (a package, no install) and returns the reference
    ``[plugins] local`` gives it: ``package.bone:bone``."""
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text("")
    (folder / package / "bone.py").write_text(docs_plugin_source())
    return f"{package}.bone:bone"
