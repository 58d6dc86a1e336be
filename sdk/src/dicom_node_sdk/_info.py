"""A plugin as the node knows it, and what it returned as the node takes it: the node's side of the contract.

Plugin authors never need these: ``@plugin`` and :class:`dicom_node_sdk.Plugin` make a
:class:`PluginInfo`, and :func:`dicom_node_sdk.loading.as_info` turns whatever an entry point names
into one. The node (registry, worker, discovery, the SDK's own worker) reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node_sdk import params as _params
from dicom_node_sdk.errors import PluginError
from dicom_node_sdk.params import NoParams
from dicom_node_sdk.results import Images, Measurements, Result, Segmentation, Volume

if TYPE_CHECKING:
    from dicom_node_sdk.api import Plugin, SeriesInput

#: What a plugin's run may return: one result, several, or None (no output).
Returned = Union[Result, Sequence[Result], None]

#: One job: the series and the validated parameters in, results out.
Runner = Callable[["SeriesInput", Any], Returned]


@dataclass(frozen=True)
class PluginInfo:
    """A plugin as the node knows it."""

    name: str
    version: str
    #: Runs one job. For a class plugin: a new instance per call, set up first (the fork-per-job path);
    #: a long-lived worker calls :meth:`prepare` instead, once.
    run: Runner
    #: A dataclass, a pydantic model or NoParams (see dicom_node_sdk.params).
    params: type = NoParams
    description: str = ""
    #: The plugin's retry policy: at most this many attempts for failures it marks retryable
    #: (PluginError(retryable=True)); None leaves it to the rule's max_attempts.
    max_attempts: int | None = None
    #: Algorithm Family (CID 7162), e.g. codes.cid7162.ArtificialIntelligence or
    #: codes.cid7162.MorphologicalOperations for classical image processing.
    family: Code = codes.cid7162.ArtificialIntelligence
    #: The plugin's own dcmqi metainfo.json for its segments (absolute, or relative to the module that
    #: declared it); a rule's ``segment_template`` takes precedence.
    segment_template: str | None = None
    #: "none", "optional" (uses a GPU when given one) or "required" (waits for one).
    gpu: str = "none"
    #: "series": run gets a SeriesInput; "study": run gets a StudyInput (a study rule's named inputs).
    takes: str = "series"
    #: The class of a class plugin (None for a function): a worker makes one instance of it per process.
    plugin_class: type[Plugin] | None = field(default=None, repr=False, compare=False)
    #: Whether the plugin is a class with its own ``setup`` (weights to load once per worker).
    has_setup: bool = field(default=False, compare=False)

    def prepare(self) -> Runner:
        """The run function of a long-lived process: for a class plugin, one instance, set up now."""
        if self.plugin_class is None:
            return self.run
        instance = self.plugin_class()
        instance.setup()
        return instance.run

    def validate_params(self, params: dict[str, Any] | None) -> Any:
        """A rule's ``params`` as the plugin's parameter object; raises ParamsError listing every problem."""
        return _params.validate(self.params, params)

    def schema(self) -> dict[str, Any]:
        """The parameters' JSON schema."""
        return _params.schema(self.params)

    def dump_params(self, params: Any) -> dict[str, Any]:
        """Validated parameters as JSON values, defaults included (what an output records it ran with)."""
        return _params.dump(self.params, params)


def as_results(name: str, out: Any) -> list[Result]:
    """What a plugin's run returned as a list of results (None: none; one result: a list of it).

    Raises PluginError naming the plugin for anything that is not a Segmentation, Images, Volume or Measurements.
    (Each result checked its own arrays when it was made.)
    """
    if out is None:
        return []
    items = list(out) if isinstance(out, (list, tuple)) else [out]
    for r in items:
        if not isinstance(r, (Segmentation, Images, Volume, Measurements)):
            raise PluginError(
                f"plugin {name} returned a {type(r).__name__}; results are Segmentation, Images, Volume or Measurements"
            )
    return items
