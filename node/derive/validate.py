"""The IOD check every output passes before it is queued, and the repairs the standard allows.

A derived object copies much of its source (patient, study, frame of reference,
for a derived image series nearly everything), and real sources are not always
valid: anonymisers drop Type 2 attributes, research exports leave out Type 1
ones, old scanners write over-long decimal strings. A receiver may refuse such
an object or, worse, file it wrongly, so the node checks each output the way a
validator would and fails the job with the first problems instead of sending it.

:func:`validate` reads the standard's tables as highdicom ships them (which
modules an IOD has and with which usage, which attributes a module has, at which
sequence path, with which type) rather than a hand-written copy, and checks:

- every Mandatory module, and every Conditional or User-optional module that is
  present (one of the attributes only it has is in the data set): Type 1
  attributes present with a value, Type 2 present (empty allowed), a Type 1C
  attribute that is present has a value; the same inside every item of each
  sequence present whose items the tables describe;
- every value against its VR (pydicom's own validators: lengths, characters,
  numbers, dates) and its count against the data dictionary's VM.

The tables give no conditions: a few Type 2C attributes whose condition the
data set itself shows (``_CONDITIONS_2C``: Patient Position of CT and MR, MR
Repetition and Inversion Time) are checked; other 1C/2C conditions, enumerated
values, the number of items a sequence must have, overlays (repeating groups),
and which functional-group macros an enhanced IOD requires (their contents are
checked where the macro is present) are not. ``dciodvfy`` (from dicom3tools)
checks those; :func:`dciodvfy` runs it when it is installed.

The tables are read once per process (about half a second; :func:`preload`
does it ahead); a check then takes milliseconds per instance, about 1 ms per
frame of a multi-frame object.

:func:`repair` fixes what the standard allows without inventing anything about
the patient; :func:`validate` afterwards says what is still wrong.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import validate_value

__all__ = ["Problem", "TablesUnavailable", "dciodvfy", "dciodvfy_path", "preload", "repair", "validate"]

#: The strictest type first: an attribute that two modules of an IOD name is as strict as the stricter one.
_STRICTNESS = {"1": 0, "1C": 1, "2": 2, "2C": 3, "3": 4}
#: String VRs whose values pydicom's validators check (others: binary, or numbers checked below).
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
_NUMBER_VRS = {"SL", "SS", "SV", "UL", "US", "UV", "FL", "FD"}
#: Information entities whose attributes a derived object shares with its source.
_SHARED_IES = {"Patient", "Study"}
#: Attributes that match an object to its patient and study at the receiver: never changed by a repair,
#: even where their type would allow it (an object that fails is better than one filed elsewhere).
_IDENTITY = {
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "StudyInstanceUID",
    "AccessionNumber",
    "StudyID",
}
#: Functional-group modules: the tables list each macro's sequence as Type 1 under both the shared and the
#: per-frame item, without the macro's usage (M/C/U) or the rule that it sits in one of the two.
_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    return [str(v) for v in value] if isinstance(value, (list, MultiValue)) else [] if value is None else [str(value)]


#: Type 2C attributes whose condition can be read from the data set (the tables give no conditions):
#: (module, keyword) -> (holds?, the condition as PS3.3 states it). Checked, and repaired, where it holds.
_CONDITIONS_2C: dict[tuple[str, str], tuple[Callable[[Dataset], bool], str]] = {
    ("general-series", "PatientPosition"): (
        lambda ds: (
            str(ds.get("SOPClassUID", "")) in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4")
            and "PatientOrientationCodeSequence" not in ds
        ),
        "required for CT and MR images without Patient Orientation Code Sequence",
    ),
    ("mr-image", "RepetitionTime"): (
        lambda ds: not ("EP" in _values(ds, "ScanningSequence") and "SK" in _values(ds, "SequenceVariant")),
        "required unless Scanning Sequence is EP and Sequence Variant is SK",
    ),
    ("mr-image", "InversionTime"): (
        lambda ds: "IR" in _values(ds, "ScanningSequence"),
        "required if Scanning Sequence includes IR",
    ),
}


class TablesUnavailable(RuntimeError):
    """The installed highdicom does not ship the standard's tables where this module reads them."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data set, in a form a person can act on (``str(problem)``)."""

    keyword: str
    #: "(gggg,eeee)"
    tag: str
    #: highdicom's module key (e.g. "mr-image"), or "" for a value check of an attribute no module names.
    module: str
    #: "1", "1C", "2", "2C", "3", or "" when no module names it.
    type: str
    #: What is wrong, e.g. "missing", "empty", "invalid value '1.234567890123456789' for VR DS: ...".
    what: str
    #: Where inside the data set: "" at the top, else e.g. "SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]".
    path: str = ""

    def __str__(self) -> str:
        where = f"{self.path}." if self.path else ""
        rule = f"Type {self.type} in module {self.module}" if self.module else "in no module of this IOD"
        return f"{where}{self.keyword} {self.tag} ({rule}): {self.what}"


# -- the standard's tables (highdicom's private copy, read in one place) --------------------------------


@dataclass
class _Node:
    """An attribute at one place in an IOD: the modules that name it there (with their type) and its items."""

    tag: BaseTag
    rules: dict[str, str] = field(default_factory=dict)  # module -> type
    children: dict[str, _Node] | None = None


@dataclass(frozen=True)
class _Module:
    key: str
    usage: str  # M, C or U
    ie: str
    tree: dict[str, _Node]
    #: Top-level keywords no other module of the IOD has: one present means the module is.
    own: frozenset[str]


@dataclass(frozen=True)
class _Iod:
    name: str
    modules: tuple[_Module, ...]
    #: All modules merged: keyword -> node, for the type of any attribute at any path.
    merged: dict[str, _Node]


def _tables() -> tuple[dict[str, str], dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """(SOP class -> IOD, IOD -> modules, module -> attributes) from highdicom 0.28's private module.

    highdicom keeps these under a private name that has moved between releases (``_iods``/``_modules``
    before 0.23, ``_standard_utils`` since); pyproject pins highdicom below 0.29, and this is the one
    place to change if it moves again.
    """
    try:
        from highdicom import _standard_utils as std

        tables = (std.get_sop_class_iod_map(), std.get_iod_module_map(), std.get_module_attribute_map())
        sample = tables[2]["patient"][0]
        if not {"keyword", "type", "path"} <= set(sample) or "usage" not in tables[1]["ct-image"][0]:
            raise KeyError("unexpected table layout")
    except (ImportError, AttributeError, KeyError, FileNotFoundError, IndexError) as e:
        import highdicom

        raise TablesUnavailable(
            f"highdicom {highdicom.__version__} does not ship the DICOM tables the way node.derive.validate reads "
            f"them (highdicom._standard_utils, as in 0.28): {e!r}; install highdicom>=0.28,<0.29 or adapt "
            "node/derive/validate.py:_tables"
        ) from e
    return tables


@functools.cache
def _iod(sop_class_uid: str) -> _Iod | None:
    """The IOD of a SOP class, arranged for checking; None if the tables do not know the class."""
    sop_iods, iod_modules, module_attributes = _tables()
    name = sop_iods.get(sop_class_uid)
    if name is None:
        return None
    merged: dict[str, _Node] = {}
    trees: list[tuple[dict[str, Any], dict[str, _Node]]] = []
    for entry in iod_modules[name]:
        key = entry["key"]
        tree: dict[str, _Node] = {}
        functional = key.endswith("-multi-frame-functional-groups")
        for attr in module_attributes[key]:
            path, kind = attr["path"], attr["type"]
            if any(tag_for_keyword(k) is None for k in (*path, attr["keyword"])):
                continue  # repeating groups (overlays) pydicom has no keyword for: not checked
            if functional and len(path) == 1 and path[0] in _FUNCTIONAL_GROUPS:
                kind = "3"  # a macro: checked where present (see _FUNCTIONAL_GROUPS)
            for target in (tree, merged):
                level = target
                for p in path:
                    parent = level.setdefault(p, _Node(Tag(p)))
                    if parent.children is None:
                        parent.children = {}
                    level = parent.children
                node = level.setdefault(attr["keyword"], _Node(Tag(attr["keyword"])))
                old = node.rules.get(key)
                if old is None or _STRICTNESS[kind] < _STRICTNESS[old]:
                    node.rules[key] = kind
        trees.append((entry, tree))
    modules = []
    for entry, tree in trees:
        others = {kw for e, t in trees if e is not entry for kw in t}
        modules.append(_Module(entry["key"], entry["usage"], entry["ie"], tree, frozenset(set(tree) - others)))
    return _Iod(name, tuple(modules), merged)


def preload(sop_class_uids: tuple[str, ...] = ()) -> None:
    """Read the tables now (about half a second, once per process) rather than in the first check."""
    _tables()
    for uid in sop_class_uids:
        _iod(uid)


# -- checks --------------------------------------------------------------------------------------------


def _tag(elem_or_tag: DataElement | BaseTag) -> str:
    t = elem_or_tag.tag if isinstance(elem_or_tag, DataElement) else elem_or_tag
    return f"({t.group:04X},{t.element:04X})"


def _tag_of(keyword: str) -> str:
    t = Tag(keyword)
    return f"({t.group:04X},{t.element:04X})"


def _empty(elem: DataElement) -> bool:
    if elem.VR == "SQ":
        return len(elem.value) == 0
    v = elem.value
    if v is None or (isinstance(v, (str, bytes, list, MultiValue)) and len(v) == 0):
        return True
    return isinstance(v, (list, MultiValue)) and all(x is None or x == "" for x in v)


def _used(iod: _Iod, ds: Dataset) -> list[_Module]:
    """The modules this data set must satisfy: the Mandatory ones and the others that are present."""
    return [m for m in iod.modules if m.usage == "M" or any(m.tree[kw].tag in ds for kw in m.own)]


#: The SR Document Content module (SR and Key Object Selection): the tables list every content item's
#: attributes as if all applied, but which are required depends on each item's Value Type (a NUM item has a
#: Measured Value Sequence, a CONTAINER its Continuity of Content). Its types are not checked from the
#: tables (highdicom builds the items by template; dciodvfy checks them), nothing is filled in there; only
#: the root item's own Type 1 attributes are checked (``_DOCUMENT_ROOT``), and every value against its VR.
_CONTENT_TREE_MODULES = frozenset({"sr-document-content"})
_DOCUMENT_ROOT = ("ValueType", "ConceptNameCodeSequence", "ContinuityOfContent")


def _typed(iod: _Iod, ds: Dataset) -> list[_Module]:
    """The modules in use whose attribute types the tables give (all but the SR content tree)."""
    return [m for m in _used(iod, ds) if m.key not in _CONTENT_TREE_MODULES]


def _document_root(iod: _Iod, ds: Dataset, out: list[Problem]) -> None:
    """The root content item of an SR document (a CONTAINER): its Type 1 attributes are present with a value."""
    for m in iod.modules:
        if m.key in _CONTENT_TREE_MODULES:
            for kw in _DOCUMENT_ROOT:
                elem = ds.get(kw)
                if elem is None or _empty(ds[kw]):
                    out.append(Problem(kw, _tag_of(kw), m.key, "1", "missing" if elem is None else "empty"))


def _check_tree(ds: Dataset, tree: dict[str, _Node], module: str, path: str, out: list[Problem]) -> None:
    for kw, node in tree.items():
        kind = node.rules[module]
        elem = ds[node.tag] if node.tag in ds else None  # (by tag: a keyword is looked up each time)
        if elem is None:
            if kind in ("1", "2"):
                out.append(Problem(kw, _tag(node.tag), module, kind, "missing", path))
            elif kind == "2C" and not path and (condition := _CONDITIONS_2C.get((module, kw))) and condition[0](ds):
                out.append(Problem(kw, _tag(node.tag), module, kind, f"missing ({condition[1]})", path))
            continue
        if kind in ("1", "1C") and _empty(elem):
            what = "empty (a sequence without items)" if elem.VR == "SQ" else "empty"
            if kind == "1C":
                what += ": a Type 1C attribute is either absent or has a value"
            out.append(Problem(kw, _tag(elem), module, kind, what, path))
        if node.children is not None and elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                _check_tree(item, node.children, module, f"{path}.{kw}[{i}]" if path else f"{kw}[{i}]", out)


def _vm_ok(vm: str, n: int) -> bool:
    """Whether ``n`` values fit the dictionary's VM ("1", "1-3", "1-n", "2-2n", "3-3n", "6", ...)."""
    m = re.fullmatch(r"(\d+)(?:-(\d*)(n?))?", vm)
    if m is None:
        return True
    low = int(m.group(1))
    if m.group(2) is None and not m.group(3):
        return n == low
    if m.group(3):  # "a-n" or "a-bn": at least a, a multiple of b
        step = int(m.group(2)) if m.group(2) else 1
        return n >= low and n % step == 0
    return low <= n <= int(m.group(2))


def _value_problem(elem: DataElement) -> str | None:
    """What is wrong with an element's value for its VR and VM (pydicom's validators), or None."""
    if elem.tag.is_private or elem.VR in ("SQ", "UN", "AT", "OB", "OW", "OD", "OF", "OL", "OV") or _empty(elem):
        return None
    values = list(elem.value) if isinstance(elem.value, (list, MultiValue)) else [elem.value]
    if elem.VR in _TEXT_VRS or elem.VR in _NUMBER_VRS:
        for v in values:
            if v is None or v == "":
                continue
            text: Any = v if elem.VR in _NUMBER_VRS else (v if isinstance(v, (str, bytes)) else str(v))
            if isinstance(v, float) and elem.VR in ("SL", "SS", "SV", "UL", "US", "UV"):
                return f"value {v!r} is not an integer (VR {elem.VR})"
            try:
                validate_value(elem.VR, text, config.RAISE)
            except ValueError as e:
                msg = str(e).split(" Please see <")[0]
                return msg if repr(text) in msg else f"value {str(text)!r}: {msg}"
    try:
        vm = dictionary_VM(elem.tag)
    except KeyError:
        return None
    if elem.VR not in ("LT", "ST", "UT", "UR") and not _vm_ok(vm, len(values)):
        return f"{len(values)} value(s), the data dictionary allows VM {vm}"
    return None


def _walk(ds: Dataset, merged: dict[str, _Node] | None, path: str) -> Iterator[tuple[DataElement, _Node | None, str]]:
    """Every element (inside sequences too) with the tables' node for its place (None where they say nothing)."""
    for elem in ds:
        node = merged.get(elem.keyword) if merged is not None and elem.keyword else None
        yield elem, node, path
        if elem.VR == "SQ":
            children = node.children if node is not None else None
            for i, item in enumerate(elem.value):
                yield from _walk(item, children, f"{path}.{elem.keyword}[{i}]" if path else f"{elem.keyword}[{i}]")


def _rule(node: _Node | None, used: set[str]) -> tuple[str, str]:
    """(module, type) of the strictest rule among the modules in use, or ("", "")."""
    if node is None:
        return "", ""
    rules = [(m, t) for m, t in node.rules.items() if m in used] or list(node.rules.items())
    return min(rules, key=lambda r: _STRICTNESS[r[1]]) if rules else ("", "")


def _strictest(problems: list[Problem]) -> list[Problem]:
    """One problem per attribute and place: that of the strictest module (several modules may name it)."""
    best: dict[tuple[str, str], Problem] = {}
    for p in problems:
        key = (p.path, p.keyword)
        if key not in best or _STRICTNESS[p.type] < _STRICTNESS[best[key].type]:
            best[key] = p
    return list(best.values())


def validate(ds: Dataset) -> list[Problem]:
    """Everything the standard's tables and the data dictionary find wrong with ``ds`` (empty: valid).

    ``ds`` is the data set the node is about to write (File Meta is not checked: pydicom writes it).
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    iod = _iod(sop_class) if sop_class else None
    out: list[Problem] = []
    if iod is None:
        name = UID(sop_class).name
        why = "missing" if not sop_class else f"{sop_class}{f' ({name})' if name != sop_class else ''} is no IOD's"
        out.append(Problem("SOPClassUID", "(0008,0016)", "sop-common", "1", why))
        merged, used = None, set()
    else:
        used = {m.key for m in _used(iod, ds)}
        for m in _typed(iod, ds):
            _check_tree(ds, m.tree, m.key, "", out)
        _document_root(iod, ds, out)
        merged = iod.merged
    out = _strictest(out)
    seen = {(p.path, p.keyword) for p in out}
    for elem, node, path in _walk(ds, merged, ""):
        what = _value_problem(elem)
        if what is not None:
            module, kind = _rule(node, used)
            keyword = elem.keyword or keyword_for_tag(elem.tag) or "(unknown)"
            if (path, keyword) not in seen:
                out.append(Problem(keyword, _tag(elem), module, kind, what, path))
    return out


# -- repairs ---------------------------------------------------------------------------------------------


#: SOP classes whose IOD allows one Modality only.
_MODALITY_OF_CLASS = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.66.7": "SEG",
}


def _type1_default(keyword: str, module: str, ds: Dataset) -> tuple[Any, str] | None:
    """A value the standard allows for a Type 1 attribute a source did not have, with why; None if none."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = _MODALITY_OF_CLASS.get(sop_class)
    if module == "mr-image" and keyword == "ScanningSequence":
        return "RM", "Research Mode: the source does not say how it was acquired"
    if module == "mr-image" and keyword == "SequenceVariant":
        return "NONE", "no sequence variant known"
    if keyword == "Modality" and modality is not None:
        return modality, f"the only value for {UID(sop_class).name}"
    if module == "sc-equipment" and keyword == "ConversionType":
        return "WSD", "made on a workstation"
    if keyword == "ImageType" and module in ("ct-image", "mr-image", "sc-image", "general-image"):
        return ["DERIVED", "SECONDARY"], "every object the node writes is derived from its source"
    return None


def _shared_from(source: Dataset | None, ds: Dataset, keyword: str, ie: str) -> DataElement | None:
    """The source's valid, non-empty element for a Patient or Study attribute of the same study, else None."""
    if source is None or ie not in _SHARED_IES or keyword not in source:
        return None
    if str(source.get("StudyInstanceUID", "")) != str(ds.get("StudyInstanceUID", "")):
        return None
    elem = source[keyword]
    if _empty(elem) or _value_problem(elem) is not None:
        return None
    return elem


def _describe(keyword: str, module: str, kind: str, path: str) -> str:
    where = f" in {path}" if path else ""
    return f"{keyword} {_tag_of(keyword)}{where} (Type {kind}, module {module})"


def _fill(ds: Dataset, source: Dataset | None, iod: _Iod, changes: list[str]) -> None:
    """Missing Type 2 attributes added (the source's value for Patient and Study, else empty); Type 1 ones the
    source has or the standard gives a value for filled in."""
    for module in _typed(iod, ds):
        problems: list[Problem] = []
        _check_tree(ds, module.tree, module.key, "", problems)
        for p in problems:
            if p.path or (p.keyword in _IDENTITY and p.keyword in ds):
                continue  # inside items: left to the builder; identity: never touched
            if p.type not in ("1", "2", "2C"):
                continue
            copied = _shared_from(source, ds, p.keyword, module.ie)
            label = _describe(p.keyword, p.module, p.type, p.path)
            if copied is not None:
                ds[copied.tag] = copy.deepcopy(copied)
                changes.append(f"{label}: {p.what} -> copied from the source ({_short(copied)})")
            elif p.type in ("2", "2C") and p.what.startswith("missing"):
                vr = dictionary_VR(p.keyword)
                ds[Tag(p.keyword)] = DataElement(Tag(p.keyword), vr, [] if vr == "SQ" else None)
                changes.append(f"{label}: {p.what} -> added empty (unknown)")
            elif p.type == "1" and (default := _type1_default(p.keyword, p.module, ds)) is not None:
                value, why = default
                ds.pop(p.keyword, None)
                setattr(ds, p.keyword, value)
                changes.append(f"{label}: {p.what} -> set to {_short(ds[p.keyword])} ({why})")


def _short(elem: DataElement) -> str:
    text = "\\".join(str(v) for v in elem.value) if isinstance(elem.value, (list, MultiValue)) else str(elem.value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _prune(ds: Dataset, merged: dict[str, _Node], used: set[str], path: str, changes: list[str]) -> None:
    """Optional attributes that are empty or invalid dropped, invalid Type 2 ones emptied (identity kept)."""
    for elem in list(ds):
        if elem.tag.is_private:
            continue
        node = merged.get(elem.keyword) if elem.keyword else None
        module, kind = _rule(node, used)
        optional = kind in ("3", "")  # "": no module of the IOD names it here (a standard extension)
        where = f"{path}." if path else ""
        label = f"{where}{elem.keyword or 'unknown'} {_tag(elem)} (" + (
            f"Type {kind}, module {module})" if module else "in no module of this IOD)"
        )
        if elem.VR == "SQ":
            if optional and len(elem.value) == 0 and kind:
                del ds[elem.tag]
                changes.append(f"{label}: empty -> dropped")
                continue
            children = node.children if node is not None else None
            if children is not None:
                for i, item in enumerate(elem.value):
                    _prune(item, children, used, f"{where}{elem.keyword}[{i}]", changes)
            continue
        if optional and kind and _empty(elem):
            del ds[elem.tag]
            changes.append(f"{label}: empty -> dropped")
            continue
        problem = _value_problem(elem)
        if problem is None or elem.keyword in _IDENTITY:  # identity is the source's: see as_in_source
            continue
        if optional:
            del ds[elem.tag]
            changes.append(f"{label}: {problem} -> dropped")
        elif kind in ("2", "2C") and elem.keyword not in _IDENTITY:
            ds[elem.tag] = DataElement(elem.tag, elem.VR, None)
            changes.append(f"{label}: {problem} -> emptied (Type 2: unknown)")


def as_in_source(problems: list[Problem], ds: Dataset, source: Dataset | None) -> tuple[list[Problem], list[Problem]]:
    """(problems, inherited): split off the problems of identity attributes that are exactly the source's.

    A Patient Name with too many components or an over-long Accession Number came with the source,
    which the PACS already holds under those values; the derived object must carry the same ones to be
    filed with it. Such values are kept (and said), not a reason to fail; anything else still is.
    """
    if source is None:
        return problems, []
    own: list[Problem] = []
    inherited: list[Problem] = []
    for p in problems:
        same = (
            not p.path
            and p.keyword in _IDENTITY
            and p.keyword in ds
            and p.keyword in source
            and ds[p.keyword].value == source[p.keyword].value
        )
        (inherited if same else own).append(p)
    return own, inherited


def repair(ds: Dataset, source: Dataset | None = None) -> list[str]:
    """Fix in place what the standard allows to be fixed; returns one line per change (empty: nothing to do).

    - Type 2 attributes missing: the source's value for a Patient or Study attribute of the same study, else
      added empty (zero length means "unknown");
    - Type 1 attributes missing or empty: the source's value (Patient and Study only), or a value the standard
      defines for "not known" (MR Scanning Sequence ``RM``, Sequence Variant ``NONE``; Modality from the SOP
      class; Image Type ``DERIVED\\SECONDARY``; SC Conversion Type ``WSD``);
    - Type 3 attributes (and attributes no module of the IOD names) that are empty or whose value does not fit
      its VR or VM: dropped; Type 2 ones with such a value: emptied.

    Nothing about the patient is invented, and the attributes that match the object to its patient and study
    (Patient Name and ID, Issuer of Patient ID, Other Patient IDs, Study Instance UID, Accession Number,
    Study ID) are never changed, not even dropped: a value that is invalid exactly as the source has it is
    kept (see :func:`as_in_source`), anything else fails the check rather than be filed elsewhere. Type 1 and
    1C attributes with an invalid value are left for :func:`validate` to report.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    iod = _iod(sop_class) if sop_class else None
    if iod is None:
        return []
    changes: list[str] = []
    _fill(ds, source, iod, changes)
    _prune(ds, iod.merged, {m.key for m in _used(iod, ds)}, "", changes)
    return changes


# -- dciodvfy (dicom3tools), when installed ---------------------------------------------------------------


def dciodvfy_path() -> str | None:
    """dicom3tools' ``dciodvfy`` if installed (Debian: ``apt-get install dicom3tools``), else None."""
    return shutil.which("dciodvfy") or next(
        (p for p in ("/usr/bin/dciodvfy", "/usr/local/bin/dciodvfy") if os.access(p, os.X_OK)), None
    )


def dciodvfy(target: Path | str | Dataset, timeout: float = 120.0) -> list[str]:
    """dciodvfy's Error lines for a file (or a data set, written to a temporary file); warnings are left out.

    Raises FileNotFoundError if dciodvfy is not installed: the node works without it.
    """
    exe = dciodvfy_path()
    if exe is None:
        raise FileNotFoundError("dciodvfy is not installed (Debian package dicom3tools)")
    if isinstance(target, Dataset):
        with tempfile.TemporaryDirectory(prefix="dciodvfy-") as tmp:
            path = Path(tmp) / "object.dcm"
            target.save_as(path, enforce_file_format=True)
            return dciodvfy(path, timeout)
    r = subprocess.run([exe, str(target)], capture_output=True, text=True, timeout=timeout)
    lines = (line.strip() for line in (r.stdout + r.stderr).splitlines())
    return [line for line in lines if line.startswith("Error")]
