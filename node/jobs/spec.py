"""The actions a job carries: what a rule's action says, stored with the job and read back when it runs.

:mod:`node.decide.rules` validates them as part of a rule (each rule's ``[[rules.actions]]`` tables) and the
series tracker stores each as the job's ``action`` (``model_dump(mode="json")``); the job runner reads it
back with the same model. They are data: the node's layers below the rules (jobs) need them without the
rule engine.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ActionBase(_Strict):
    #: "urgent": the job is claimed (and given a GPU) before every normal job.
    priority: Literal["normal", "urgent"] = "normal"

    def _urgent_note(self) -> str:
        return " (urgent)" if self.priority == "urgent" else ""


class PluginStep(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(value: Any) -> Any:
    """A duration as seconds: a number, or a string such as "90s", "30m", "1h", "2d" (else left for pydantic)."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m is None:
            raise ValueError(f'{value!r} is not a duration: give seconds (3600) or e.g. "90s", "30m", "1h", "2d"')
        return float(m.group(1)) * _UNIT_SECONDS[m.group(2) or "s"]
    return value


_PatientKey = Literal["PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate"]


class PriorsRequest(_Strict):
    """``priors = { from = "pacs", same = ["PatientID"], modality = "CT", within_days = 730, max = 2 }``.

    Before the plugin runs, the node asks the ``[[sources]]`` entry ``from`` (C-FIND, study level) for the
    patient's other studies and retrieves the newest ``max`` it does not hold (node.qr.priors); the plugin
    gets them as ``inputs.priors``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: str = Field(alias="from", min_length=1)
    #: The new study's attributes a prior must share (query keys, matched exactly); PatientID is required.
    same: list[_PatientKey] = Field(default_factory=lambda: list[_PatientKey](["PatientID"]))
    #: Only studies with this modality (Modalities in Study); empty: any.
    modality: str = ""
    #: Only studies at most this many days before the new one (Study Date).
    within_days: int = Field(730, ge=1)
    #: The newest this many studies.
    max: int = Field(2, ge=1, le=20)
    #: How long after the job was made it may wait for a source that is down or refusing before it fails.
    timeout: Annotated[float, BeforeValidator(seconds), Field(gt=0)] = 3600.0
    #: With no prior found: run the plugin without (true) or fail the job (false).
    optional: bool = True

    @field_validator("same")
    @classmethod
    def _patient(cls, v: list[str]) -> list[str]:
        if "PatientID" not in v:
            raise ValueError('must include "PatientID" (a prior is another study of the same patient)')
        return v


class KeyObjectTitle(_Strict):
    """``key_objects = { value = "113000", scheme = "DCM", meaning = "Of Interest" }``: a Key Object Selection
    Document Title (CID 7010) for the job's Key Object Selection document."""

    value: str = Field(min_length=1, max_length=16)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)
    #: Key Object Description: free text a viewer shows with the selection.
    description: str = Field("", max_length=1024)


class PluginAction(_ActionBase):
    """Run one plugin (``plugin`` + ``params``) or a chain (``plugins``), and send the results."""

    type: Literal["plugin"]
    plugin: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    plugins: list[PluginStep] = Field(default_factory=list)
    send_to: list[str] = Field(default_factory=list)
    #: Wall-clock seconds and memory (MB) for the plugin process; default from [plugins].
    timeout: float | None = Field(None, gt=0)
    memory_limit_mb: int | None = Field(None, ge=0)
    #: Encoding of the derived objects: uncompressed, or lossless JPEG 2000 / RLE. Unset: what the
    #: send_to destinations ask for (their derived_compression), else uncompressed.
    compression: Literal["none", "jpeg2000", "rle"] | None = None
    #: SEG: keep frames without any segment (some viewers need one frame per source image).
    keep_empty_frames: bool = False
    #: Series Number of the first output series (later outputs count up) and their description.
    series_number: int = Field(9000, ge=0, le=2**31 - 1)
    series_description: str = Field("", max_length=64)
    #: A dcmqi metainfo.json whose segments describe the SEG(s) (labels, codes, colours), by label value.
    segment_template: str | None = None
    #: A label value without a template entry: fail the job, or leave that segment out.
    unknown_labels: Literal["error", "skip"] = "error"
    #: Whether the job wants a GPU from [plugins] gpus; None: what the plugin declares.
    gpu: Literal["none", "optional", "required"] | None = None
    #: Prior studies of the patient to fetch from a [[sources]] PACS before the run (see PriorsRequest).
    priors: PriorsRequest | None = None
    #: After the outputs, one Key Object Selection document listing them (sent with them): true for the title
    #: "Of Interest" (DCM 113000), or a title code of CID 7010.
    key_objects: StrictBool | KeyObjectTitle = False

    @model_validator(mode="after")
    def _template(self) -> PluginAction:
        if self.segment_template is not None:
            from node.derive.template import TemplateError, load_template

            try:
                load_template(self.segment_template)
            except TemplateError as e:
                raise ValueError(str(e)) from None
        return self

    @model_validator(mode="after")
    def _one_form(self) -> PluginAction:
        if (self.plugin is None) == (not self.plugins):
            raise ValueError('give either plugin = "name" (with params) or plugins = [{ name = ... }, ...]')
        if self.plugins and self.params:
            raise ValueError("with plugins = [...], give each plugin's params inside its own table")
        return self

    @property
    def steps(self) -> list[PluginStep]:
        return self.plugins or [PluginStep(name=self.plugin or "", params=self.params)]

    def summary(self) -> str:
        names = " then ".join(s.name for s in self.steps)
        sent = f", send results to {', '.join(self.send_to)}" if self.send_to else ""
        gpu = f", gpu {self.gpu}" if self.gpu is not None else ""
        return f"run {names}{sent}{gpu}{self._urgent_note()}"


class ForwardAction(_ActionBase):
    """Send the source series (the instances of the triggering revision) to destinations."""

    type: Literal["forward"]
    to: list[str] = Field(min_length=1)

    def summary(self) -> str:
        return f"forward the series to {', '.join(self.to)}{self._urgent_note()}"


class DiscardAction(_ActionBase):
    """Delete the revision's instances from this node (files and index rows)."""

    type: Literal["discard"]

    def summary(self) -> str:
        return "discard the series" + self._urgent_note()


Action = Annotated[PluginAction | ForwardAction | DiscardAction, Field(discriminator="type")]
