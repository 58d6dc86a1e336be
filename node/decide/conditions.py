"""Rule conditions: parsed once from TOML tables, evaluated against a series' facts.

A condition never runs code from the config: each TOML value is turned into
one of a fixed set of operators at load time, and anything else is an error
that names the rule and the key. Evaluation answers not just yes/no but,
for a no, the first condition that failed and the value the series had, so
``dicom-node rules explain`` can tell an administrator *why*.

The match table::

    [rules.match]
    Modality = "CT"                                     # equals
    BodyPartExamined = ["CHEST", "THORAX"]              # one of
    SeriesDescription = { regex = "lung|thorax", ignore_case = true }
    SliceThickness = { "<=" = 3 }                       # also <, >, >=, range = [lo, hi]
    ImageType = { contains = "PRIMARY" }                # multi-valued attributes
    ContrastBolusAgent = { exists = false }             # or missing = true
    instances = { ">=" = 50 }                           # counts: instances, frames
    calling_ae = "CT_SCANNER_1"                         # also called_ae
    orientation = "axial"                               # from ImageOrientationPatient
    not = { ImageType = { contains = "LOCALIZER" } }
    any = [ { Manufacturer = "SIEMENS" }, { StationName = "CT1" } ]
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword

#: Keys that are not DICOM keywords: what the node knows about the series besides its attributes.
SPECIAL_KEYS = {
    "calling_ae": "the calling AE title of the association that sent the series",
    "called_ae": "the AE title the sender called",
    "instances": "the number of instances in the series",
    "frames": "the number of frames in the series (1 per single-frame instance)",
    "revision": "the series revision (1, then 2 for instances that arrived after it triggered, ...)",
    "orientation": "axial, sagittal or coronal (nearest plane), or oblique (more than 30 degrees from all three)",
}
#: Facts unknown until the whole series has arrived; a partial evaluation treats them as satisfied.
COUNT_KEYS = frozenset({"instances", "frames"})
COMBINATORS = ("all", "any", "not")

_COMPARE = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
_ALIASES = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "equals", "in": "one_of"}
OPERATORS = ("equals", "one_of", "regex", "<", "<=", ">", ">=", "range", "exists", "missing", "contains")
MODIFIERS = ("ignore_case",)


class ConditionError(ValueError):
    """Conditions that cannot be parsed: ``problems`` holds (path in the match table, message) for each.

    ``path`` and ``message`` are the first; a match table is checked whole, so that one run of
    ``rules check`` names every mistake in it rather than one per try.
    """

    def __init__(self, path: str, message: str, more: Sequence[tuple[str, str]] = ()) -> None:
        self.problems = [(path, message), *more]
        super().__init__("; ".join(f"{p}: {m}" for p, m in self.problems))
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer of one condition: held or not, and for a failure, why."""

    ok: bool
    why: str = ""


class Facts(Mapping[str, Any]):
    """What a rule can look at. Values: ``None`` (missing), str, int, float or a list (multi-valued)."""

    def __init__(self, values: Mapping[str, Any], lookup: Callable[[str], Any] | None = None) -> None:
        self._values = dict(values)
        self._lookup = lookup

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            self._values[key] = self._lookup(key) if self._lookup else None
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _show(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, list):
        return "\\".join(str(v) for v in value) if value else "empty"
    if isinstance(value, str):
        return f'"{value}"' if value else "empty"
    return str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            n = float(value.strip())
        except ValueError:
            return None
        return n if math.isfinite(n) else None
    return None


def _values(actual: Any) -> list[Any]:
    return list(actual) if isinstance(actual, list) else [actual]


class Condition:
    def evaluate(self, facts: Mapping[str, Any], partial: bool = False) -> Outcome:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Test:
    """One operator applied to one key, e.g. ``SliceThickness <= 3``."""

    key: str
    op: str
    operand: Any
    ignore_case: bool = False

    def describe(self) -> str:
        case = " (ignoring case)" if self.ignore_case else ""
        if self.op in ("exists", "missing"):
            present = (self.op == "exists") == bool(self.operand)
            return f"{self.key} is {'present' if present else 'missing'}"
        if self.op == "range":
            return f"{self.key} in [{self.operand[0]}, {self.operand[1]}]"
        if self.op == "one_of" and len(self.operand) == 1:
            return f"{self.key} = {_show(self.operand[0])}{case}"
        if self.op == "one_of":
            return f"{self.key} is one of {', '.join(_show(v) for v in self.operand)}{case}"
        if self.op == "regex":
            return f"{self.key} matches /{self.operand.pattern}/{case}"
        if self.op == "contains":
            return f"{self.key} contains {' and '.join(_show(v) for v in self.operand)}{case}"
        if self.op == "equals":
            return f"{self.key} = {_show(self.operand)}{case}"
        return f"{self.key} {self.op} {self.operand}"

    def _text_eq(self, a: Any, b: Any) -> bool:
        na, nb = _number(a), _number(b)
        if not isinstance(b, str) and na is not None and nb is not None:
            return na == nb
        sa, sb = str(a).strip(), str(b).strip()
        return sa.casefold() == sb.casefold() if self.ignore_case else sa == sb

    def holds(self, actual: Any) -> bool:
        op = self.op
        if op in ("exists", "missing"):
            present = actual is not None and actual != "" and actual != []
            return present == ((op == "exists") == bool(self.operand))
        if actual is None:
            return False
        if op == "equals":
            if isinstance(self.operand, list):
                vals = _values(actual)
                return len(vals) == len(self.operand) and all(map(self._text_eq, vals, self.operand))
            if isinstance(actual, list):
                return self._text_eq("\\".join(str(v) for v in actual), self.operand)
            return self._text_eq(actual, self.operand)
        if op == "one_of":
            return any(
                self._text_eq(actual if not isinstance(actual, list) else "\\".join(map(str, actual)), o)
                for o in self.operand
            )
        if op == "regex":
            return any(self.operand.search(str(v)) is not None for v in _values(actual))
        if op == "contains":
            vals = _values(actual)
            single_text = len(vals) == 1 and isinstance(vals[0], str)
            for wanted in self.operand:
                if any(self._text_eq(v, wanted) for v in vals):
                    continue
                if single_text:  # a single text value: contains means substring
                    hay, needle = str(vals[0]), str(wanted)
                    if self.ignore_case:
                        hay, needle = hay.casefold(), needle.casefold()
                    if needle in hay:
                        continue
                return False
            return True
        nums = [_number(v) for v in _values(actual)]
        if not nums or any(n is None for n in nums):
            return False
        if op == "range":
            lo, hi = self.operand
            return all(lo <= n <= hi for n in nums)
        return all(_COMPARE[op](n, self.operand) for n in nums)


@dataclass(frozen=True)
class Compare(Condition):
    """All tests on one key (``{ ">=" = 1, "<=" = 3 }`` is two tests)."""

    key: str
    tests: tuple[Test, ...]

    def evaluate(self, facts: Mapping[str, Any], partial: bool = False) -> Outcome:
        if partial and self.key in COUNT_KEYS and facts.get(self.key) is None:
            return Outcome(True)
        actual = facts.get(self.key)
        for t in self.tests:
            if not t.holds(actual):
                if actual is None:
                    what = "not known for this series" if self.key in SPECIAL_KEYS else "missing in the series"
                    return Outcome(False, f"{t.describe()}: {what}")
                return Outcome(False, f"{t.describe()}: the series has {_show(actual)}")
        return Outcome(True)

    def describe(self) -> str:
        return " and ".join(t.describe() for t in self.tests)


@dataclass(frozen=True)
class All(Condition):
    children: tuple[Condition, ...]

    def evaluate(self, facts: Mapping[str, Any], partial: bool = False) -> Outcome:
        for c in self.children:
            out = c.evaluate(facts, partial)
            if not out.ok:
                return out
        return Outcome(True)

    def describe(self) -> str:
        if not self.children:
            return "always"
        return " and ".join(_paren(c) for c in self.children)


@dataclass(frozen=True)
class AnyOf(Condition):
    children: tuple[Condition, ...]

    def evaluate(self, facts: Mapping[str, Any], partial: bool = False) -> Outcome:
        reasons = []
        for c in self.children:
            out = c.evaluate(facts, partial)
            if out.ok:
                return out
            reasons.append(out.why)
        return Outcome(False, "none of the alternatives holds: " + "; ".join(reasons))

    def describe(self) -> str:
        return " or ".join(_paren(c) for c in self.children)


@dataclass(frozen=True)
class Not(Condition):
    child: Condition

    def evaluate(self, facts: Mapping[str, Any], partial: bool = False) -> Outcome:
        if partial and _mentions_counts(self.child):
            return Outcome(True)
        if self.child.evaluate(facts, partial).ok:
            return Outcome(False, f"not ({self.child.describe()}): but it holds")
        return Outcome(True)

    def describe(self) -> str:
        return f"not {_paren(self.child)}"


def _paren(c: Condition) -> str:
    d = c.describe()
    return f"({d})" if isinstance(c, (All, AnyOf)) and len(c.children) > 1 else d


def _mentions_counts(c: Condition) -> bool:
    if isinstance(c, Compare):
        return c.key in COUNT_KEYS
    if isinstance(c, (All, AnyOf)):
        return any(_mentions_counts(x) for x in c.children)
    if isinstance(c, Not):
        return _mentions_counts(c.child)
    return False


# -- parsing ---------------------------------------------------------------


def _check_key(key: str, path: str) -> None:
    if key in SPECIAL_KEYS:
        return
    if tag_for_keyword(key) is None:
        hint = ""
        lowered = {k.lower(): k for k in SPECIAL_KEYS}
        if key.lower() in lowered:
            hint = f" (did you mean {lowered[key.lower()]!r}?)"
        raise ConditionError(
            path,
            f"{key!r} is not a DICOM keyword{hint}; use keywords as in PS3.6 (e.g. SeriesDescription) or one of "
            + ", ".join(SPECIAL_KEYS),
        )


def _scalar(value: Any, path: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConditionError(path, f"expected a text or a number, got {value!r}")
    return value


def _num(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConditionError(path, f"expected a number, got {value!r}")
    return float(value)


def _parse_tests(key: str, spec: Any, path: str) -> tuple[Test, ...]:
    if key == "orientation":
        return _orientation_tests(spec, path)
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            return (Test(key, "one_of", tuple(_scalar(v, path) for v in spec)),)
        return (Test(key, "equals", _scalar(spec, path)),)
    ignore_case = spec.get("ignore_case", False)
    if not isinstance(ignore_case, bool):
        raise ConditionError(f"{path}.ignore_case", f"expected true or false, got {ignore_case!r}")
    tests = []
    for raw_op, operand in spec.items():
        if raw_op in MODIFIERS:
            continue
        op = _ALIASES.get(raw_op, raw_op)
        where = f"{path}.{raw_op}" if raw_op.isidentifier() else f'{path}."{raw_op}"'
        if op not in OPERATORS:
            raise ConditionError(
                where, f"unknown operator {raw_op!r}; operators: {', '.join(OPERATORS)}, and ignore_case = true"
            )
        if op == "equals":
            value = [_scalar(v, where) for v in operand] if isinstance(operand, list) else _scalar(operand, where)
            tests.append(Test(key, op, value, ignore_case))
        elif op == "one_of":
            if not isinstance(operand, list) or not operand:
                raise ConditionError(where, f"expected a non-empty list, got {operand!r}")
            tests.append(Test(key, op, tuple(_scalar(v, where) for v in operand), ignore_case))
        elif op == "regex":
            if not isinstance(operand, str):
                raise ConditionError(where, f"expected a regular expression as text, got {operand!r}")
            try:
                rx = re.compile(operand, re.IGNORECASE if ignore_case else 0)
            except re.error as e:
                raise ConditionError(where, f"invalid regular expression {operand!r}: {e}") from None
            tests.append(Test(key, op, rx, ignore_case))
        elif op in _COMPARE:
            tests.append(Test(key, op, _num(operand, where)))
        elif op == "range":
            if not isinstance(operand, list) or len(operand) != 2:
                raise ConditionError(where, f"expected [low, high], got {operand!r}")
            lo, hi = _num(operand[0], where), _num(operand[1], where)
            if lo > hi:
                raise ConditionError(where, f"the low end {operand[0]} is above the high end {operand[1]}")
            tests.append(Test(key, op, (lo, hi)))
        elif op in ("exists", "missing"):
            if not isinstance(operand, bool):
                raise ConditionError(where, f"expected true or false, got {operand!r}")
            tests.append(Test(key, op, operand))
        elif op == "contains":
            values = operand if isinstance(operand, list) else [operand]
            if not values:
                raise ConditionError(where, "expected a value or a non-empty list")
            tests.append(Test(key, op, tuple(_scalar(v, where) for v in values), ignore_case))
    if not tests:
        raise ConditionError(path, "no operator given (only modifiers)")
    return tuple(tests)


def _orientation_tests(spec: Any, path: str) -> tuple[Test, ...]:
    """``orientation`` takes a plane name or a list of them (any case); other operators make no sense."""
    if isinstance(spec, dict):
        extra = set(spec) - {"equals", "one_of", "eq", "in", "ignore_case"}
        if extra:
            raise ConditionError(path, f"orientation takes a plane or a list of planes, not {sorted(extra)[0]!r}")
        spec = spec.get("equals", spec.get("eq", spec.get("one_of", spec.get("in"))))
    values = spec if isinstance(spec, list) else [spec]
    if not values:
        raise ConditionError(path, "expected a plane or a non-empty list of planes")
    bad = [v for v in values if not isinstance(v, str) or v.lower() not in ORIENTATIONS]
    if bad:
        raise ConditionError(path, f"orientation is one of {', '.join(ORIENTATIONS)}, not {bad[0]!r}")
    # The fact is always lower case, so lower-casing the operands is all "any case" needs.
    return (Test("orientation", "one_of", tuple(v.lower() for v in values)),)


def parse_match(table: Any, path: str = "match") -> Condition:
    """A match table (or a list of them, for ``any``/``all``) as one condition tree."""
    if not isinstance(table, dict):
        raise ConditionError(path, f"expected a table of conditions, got {table!r}")
    children: list[Condition] = []
    problems: list[tuple[str, str]] = []
    for key, spec in table.items():
        try:
            children.append(_parse_entry(key, spec, f"{path}.{key}"))
        except ConditionError as e:  # go on: the other entries' problems are reported with it
            problems.extend(e.problems)
    if problems:
        raise ConditionError(*problems[0], problems[1:])
    return children[0] if len(children) == 1 else All(tuple(children))


def _parse_entry(key: str, spec: Any, where: str) -> Condition:
    """One entry of a match table: ``all``/``any`` (a list of tables), ``not`` (a table) or a fact's test."""
    if key in ("all", "any"):
        items = spec if isinstance(spec, list) else None
        if not items:
            raise ConditionError(
                where,
                f'expected a non-empty list of tables, e.g. {key} = [{{ Modality = "CT" }}, {{ Modality = "MR" }}]',
            )
        if any(t == {} for t in items):
            raise ConditionError(where, "contains an empty table (it would always hold)")
        parsed: list[Condition] = []
        problems: list[tuple[str, str]] = []
        for i, t in enumerate(items):
            try:
                parsed.append(parse_match(t, f"{where}[{i}]"))
            except ConditionError as e:
                problems.extend(e.problems)
        if problems:
            raise ConditionError(*problems[0], problems[1:])
        return All(tuple(parsed)) if key == "all" else AnyOf(tuple(parsed))
    if key == "not":
        if spec == {}:
            raise ConditionError(where, "an empty table: not = {} would never match")
        return Not(parse_match(spec, where))
    _check_key(key, where)
    return Compare(key, _parse_tests(key, spec, where))


# -- derived facts -----------------------------------------------------------

ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique")
_OBLIQUE_COS = math.cos(math.radians(30))


def orientation(iop: Any) -> str | None:
    """The plane an image lies in, from ImageOrientationPatient (row and column direction cosines).

    The slice normal is row x column; its largest patient-axis component names
    the plane (x: sagittal, y: coronal, z: axial). More than 30 degrees from
    every axis is "oblique".
    """
    try:
        v = [float(x) for x in _values(iop)]
    except (TypeError, ValueError):
        return None
    if len(v) != 6:
        return None
    r, c = v[:3], v[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(x * x for x in n))
    if norm < 1e-6:
        return None
    axis = max(range(3), key=lambda i: abs(n[i]))
    if abs(n[axis]) / norm < _OBLIQUE_COS:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]
