"""What a ``[plugins.commands.NAME]`` table may say: checked when the config loads.

Kept apart from :mod:`node.plugins.commands` (which runs them and reads their outputs with numpy and
pydicom) so that loading the config imports neither.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_PLACEHOLDER = re.compile(r"\{(\w*)\}")


class CommandPlugin(BaseModel):
    """One ``[plugins.commands.NAME]`` table."""

    model_config = ConfigDict(extra="forbid")

    #: The program and its arguments; "{input}" and "{output}" become the folders. With ``container``:
    #: the arguments given to the image (its entrypoint runs them).
    command: list[str] | None = None
    #: A container image, run with ``runtime`` (it must be on this machine already: nothing is pulled).
    container: str | None = None
    runtime: Literal["podman", "docker"] = "podman"
    #: "required": the job waits for a GPU; "optional": one is given when free; "none": never.
    gpu: Literal["none", "optional", "required"] = "none"
    #: What the command writes: DICOM objects, a label map with metainfo.json, or either ("auto").
    output: Literal["auto", "dicom", "labelmap"] = "auto"
    #: A dcmqi metainfo.json describing the label map's values, for commands that do not write one.
    metainfo: Path | None = None
    version: str = "1.0"
    description: str = ""
    #: Extra environment variables of the command (in the container for an image).
    env: dict[str, str] = Field(default_factory=dict)
    #: mercure module settings: written to task.json ("process" > "settings") in the input folder.
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v or not v[0].strip():
            raise ValueError('give the program and its arguments, e.g. ["/opt/tool/run.sh", "{input}", "{output}"]')
        for arg in v:
            for word in _PLACEHOLDER.findall(arg):
                if word not in ("input", "output"):
                    raise ValueError(f"{arg!r}: {{{word}}} is not a placeholder; use {{input}} and {{output}}")
        return v

    @field_validator("metainfo")
    @classmethod
    def _metainfo(cls, v: Path | None) -> Path | None:
        if v is not None:
            from node.derive.template import TemplateError, load_template

            try:
                load_template(v)
            except TemplateError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key!r} is not an environment variable name")
        return v

    @model_validator(mode="after")
    def _what_runs(self) -> CommandPlugin:
        if self.container is None:
            if self.command is None:
                raise ValueError('give command = ["/path/to/program", "{input}", "{output}"] or container = "image"')
            if "runtime" in self.model_fields_set:
                raise ValueError(f'runtime = "{self.runtime}" is for a container; this plugin runs a command')
            if shutil.which(self.command[0]) is None:
                where = "does not exist or is not executable" if "/" in self.command[0] else "is not on PATH"
                raise ValueError(f"command[0] = {self.command[0]!r} {where}")
        else:
            if not self.container.strip():
                raise ValueError('container = "": give the image, e.g. "localhost/totalseg:1"')
            if shutil.which(self.runtime) is None:
                other = "docker" if self.runtime == "podman" else "podman"
                raise ValueError(
                    f'runtime = "{self.runtime}": {self.runtime} is not on PATH; install it, or set runtime = "{other}"'
                )
        return self
