"""``dicom-node plugins new``: a plugin package that installs and passes its own test as it is written.

A new plugin author should start from something that works end to end (entry point, parameters model,
a test without a node, a README with the loop) and change it, rather than assemble those from the
docs. The files are templates in ``scaffold_template/`` (``$name``, ``$module`` filled in by
:class:`string.Template`; a path part ``__module__`` becomes the module's name), so what a new package
looks like is read and changed there, not in Python strings.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import string
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).parent / "scaffold_template"
#: What a rule writes as ``plugin = "..."``, and the package's name: lowercase words joined by hyphens.
NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
MAX_NAME = 64


class ScaffoldError(Exception):
    """The package cannot be made (a bad name, a folder in use); the message says what to change."""


@dataclass(frozen=True)
class Scaffolded:
    folder: Path
    files: list[Path]
    #: The commands that take the new package through its loop, in order.
    next_steps: list[str]


def module_name(name: str) -> str:
    """The Python module of plugin ``name`` (``liver-seg`` -> ``liver_seg``), checked to be usable."""
    if not NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise ScaffoldError(
            f"plugin name {name!r}: use lowercase letters, digits and hyphens, starting with a letter "
            f"(at most {MAX_NAME} characters), e.g. liver-seg"
        )
    module = name.replace("-", "_")
    if keyword.iskeyword(module):
        raise ScaffoldError(f"plugin name {name!r}: {module!r} is a Python keyword; choose another name")
    # A module of that name already importable here (numpy, node, an installed plugin) would be shadowed
    # by the new one, or shadow it.
    if importlib.util.find_spec(module) is not None:
        raise ScaffoldError(
            f"plugin name {name!r}: a module named {module!r} is already importable in this Python; "
            "choose another name (e.g. prefix it with your group's)"
        )
    return module


def scaffold(name: str, folder: Path) -> Scaffolded:
    """Write the package for plugin ``name`` into ``folder`` (new, or an empty folder)."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ScaffoldError(f"{folder} exists and is not an empty folder; give a new folder: plugins new {name} DIR")
    module = module_name(name)
    values = {"name": name, "module": module}
    files = []
    for template in sorted(TEMPLATE.rglob("*.tmpl")):
        rel = template.relative_to(TEMPLATE).with_suffix("")
        target = folder.joinpath(*(part.replace("__module__", module) for part in rel.parts))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(string.Template(template.read_text()).substitute(values))
        files.append(target)
    return Scaffolded(
        folder,
        files,
        [
            f"cd {folder}",
            "pip install -e .",
            "python -m pytest",
            f"dicom-node plugins run {name} /path/to/series --out out/",
        ],
    )
