"""Rules: which completed series trigger which actions, declared as data in the TOML config.

::

    [[rules]]
    name = "ct-bone"
    priority = 10              # higher first; equal priorities keep file order; or "urgent"
    stop = true                # when it matches, the rules after it (in evaluation order) are not evaluated
    stable_after = 30          # seconds without a new instance (overrides [tracker] stable_after)
    expected_instances = 200   # complete as soon as this many arrived
    on_revision = "ignore"     # or "rerun": instances after triggering open a revision; rerun it?
    [rules.match]
    Modality = "CT"
    [[rules.actions]]
    type = "plugin"            # run a plugin, send its results
    plugin = "threshold-seg"
    params = { lower = 300 }
    send_to = ["pacs"]
    priority = "urgent"        # this action's job goes before every normal job (default "normal")
    gpu = "required"           # overrides the plugin's own "none" | "optional" | "required"
    [[rules.actions]]
    type = "forward"           # send the source series
    to = ["pacs"]
    [[rules.actions]]
    type = "discard"           # delete the series from this node

A study rule (``scope = "study"``) fires once for a study when the series it names have arrived::

    [[rules]]
    name = "ct-enhancement"
    scope = "study"
    primary = "ct_contrast"    # the input outputs are built on (default: the first input)
    [rules.match]              # every series the rule considers meets this
    Modality = "CT"
    [rules.inputs.ct_plain]    # each input: conditions on one series of the study
    ContrastBolusAgent = { exists = false }
    [rules.inputs.ct_contrast]
    ContrastBolusAgent = { exists = true }
    [[rules.actions]]
    type = "plugin"
    plugin = "enhancement"     # a plugin with takes = "study" gets every input; others get the primary

Without ``inputs`` it fires once every series of the study is stable and no instance arrived in the
study for ``study_quiet`` (default 120 s; seconds or "2m"), with every matching series as an input.

Everything is checked when the rules are compiled (node.decide.compile, before the node listens); an
error names the rule, the field and what is wrong.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from node.config import error_text, loc_to_key
from node.decide.conditions import Condition, ConditionError, Outcome, parse_match
from node.jobs.spec import Action, DiscardAction, seconds
from node.jobs.spec import ForwardAction as ForwardAction  # the action types are the jobs' data; rules build them
from node.jobs.spec import PluginAction as PluginAction
from node.plugins.inputs import input_keys

#: Added to the priority of an urgent job (an action's or its rule's ``priority = "urgent"``). Jobs are
#: claimed, and GPU devices given, by priority (higher first), so every urgent job goes before every normal
#: one; among urgent jobs the rules' priorities still order them.
URGENT = 1_000_000
#: A rule's priority as a number stays within +-PRIORITY_LIMIT, so that URGENT keeps urgent jobs above.
PRIORITY_LIMIT = 99_999


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
#: A study rule's input name: what a study plugin indexes its StudyInput with.
_INPUT = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
#: Seconds without an instance in a study before a study rule without inputs fires (its ``study_quiet``).
DEFAULT_STUDY_QUIET = 120.0
#: Keys only a study rule has, and the series-rule keys a study rule refuses (with why).
_STUDY_ONLY = ("inputs", "study_quiet", "primary")
_SERIES_ONLY = {
    "stop": "a study rule never stops series rules (they are evaluated for each series on their own)",
    "stable_after": "a series' timing belongs to series rules; a study rule waits for its inputs to be "
    "stable (and, without inputs, for study_quiet)",
    "expected_instances": "a series' timing belongs to series rules; a study rule waits for its inputs to be stable",
}


class RuleModel(_Strict):
    name: str
    #: Evaluation order (higher first), and the priority of the rule's jobs; "urgent": first of all.
    priority: int | Literal["urgent"] = 0
    enabled: bool = True
    match: dict[str, Any] = Field(default_factory=dict)
    actions: list[Action] = Field(min_length=1)
    stop: bool = False
    stable_after: float | None = Field(None, gt=0, le=86400)
    expected_instances: int | None = Field(None, ge=1)
    on_revision: Literal["ignore", "rerun"] = "ignore"
    max_attempts: int = Field(3, ge=1, le=100)
    #: "series": evaluated for each stable series; "study": once a study has the series it needs.
    scope: Literal["series", "study"] = "series"
    #: A study rule's named inputs: conditions on one series of the study each (different series).
    inputs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: A study rule without inputs: seconds without an instance in the study before it fires.
    study_quiet: Annotated[float, BeforeValidator(seconds), Field(gt=0, le=86400)] | None = None
    #: The input outputs are built on (default: the first input).
    primary: str | None = None

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> Any:
        if value == "urgent" or (
            isinstance(value, int) and not isinstance(value, bool) and -PRIORITY_LIMIT <= value <= PRIORITY_LIMIT
        ):
            return value
        raise ValueError(f'give a whole number from -{PRIORITY_LIMIT} to {PRIORITY_LIMIT} (higher first) or "urgent"')

    @property
    def urgent(self) -> bool:
        return self.priority == "urgent"

    @property
    def rank(self) -> int:
        """The rule's place in evaluation order as a number: an urgent rule comes before every other."""
        return PRIORITY_LIMIT + 1 if self.priority == "urgent" else int(self.priority)

    def job_priority(self, action: PluginAction | ForwardAction | DiscardAction) -> int:
        """The priority of the job ``action`` makes: the rule's rank, plus URGENT if the rule or action is urgent."""
        return self.rank + (URGENT if self.urgent or action.priority == "urgent" else 0)


@dataclass(frozen=True)
class Rule:
    model: RuleModel
    condition: Condition
    #: Position in the config file, for messages and as the tie-breaker of equal priorities.
    index: int
    #: A study rule's inputs, in declared order, as conditions.
    inputs: Mapping[str, Condition] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def study(self) -> bool:
        return self.model.scope == "study"

    def describe(self) -> list[str]:
        """When the rule fires, in words (``rules check``): its conditions, and a study rule's inputs."""
        if not self.study:
            return [f"when {self.condition.describe()}"]
        m = self.model
        where = self.condition.describe()
        lines = ["for each study:" if where == "always" else f"for each study, of its series where {where}:"]
        if not self.inputs:
            quiet = m.study_quiet if m.study_quiet is not None else DEFAULT_STUDY_QUIET
            return [*lines, f"when every series is stable and none arrived for {quiet:g} s (all series are inputs)"]
        primary = m.primary or next(iter(self.inputs))
        for name, condition in self.inputs.items():
            lines.append(f"input {name}{' (primary)' if name == primary else ''}: {condition.describe()}")
        return [*lines, "when each input has a stable series"]


@dataclass(frozen=True)
class StudySeries:
    """One series of a study as study rules see it (node.decide.tracker reads them from the index)."""

    series_id: int
    series_uid: str
    series_number: int | None
    #: Its latest revision whose series rules were evaluated (what a study rule takes).
    revision: int
    #: Whether that revision is the series' current state (False: instances are still arriving).
    stable: bool
    last_received_at: dt.datetime
    #: What conditions look at (None while it is arriving, or when its first instance cannot be read).
    facts: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class StudyResult:
    """A study rule's answer for a study now: ``ready`` (to fire with ``inputs``), ``waiting``, ``not matched``
    or ``disabled``; ``why`` says what it waits for (``missing``: the inputs without a series)."""

    rule: Rule
    status: str
    why: str = ""
    inputs: Mapping[str, StudySeries] = field(default_factory=dict)
    primary: str = ""
    missing: tuple[str, ...] = ()
    #: When a waiting rule is to be looked at again (the end of its quiet period); None: at the next series.
    due: dt.datetime | None = None

    @property
    def key(self) -> str:
        """The input revision set as a digest: a study rule fires once for each (study_trigger.inputs_key)."""
        text = "\n".join(f"{name}={s.series_id}:{s.revision}" for name, s in sorted(self.inputs.items()))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class RuleResult:
    rule: Rule
    #: "matched", "not matched", "disabled", "skipped", "not for revisions"
    status: str
    why: str = ""

    @property
    def fired(self) -> bool:
        return self.status == "matched"


class RulesError(ValueError):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


#: The action union's own errors, in words (their inputs are tables, never shown).
_TAG_ERRORS = {
    "union_tag_invalid": "type must be one of plugin, forward, discard",
    "union_tag_not_found": 'each action needs a type: "plugin", "forward" or "discard"',
}


def _loc(loc: Iterable[Any]) -> str:
    """An error location as a config key, without the union tag pydantic inserts after actions[i]."""
    parts = list(loc)
    kept = [
        part
        for n, part in enumerate(parts)
        if not (
            n >= 2
            and parts[n - 2] == "actions"
            and isinstance(parts[n - 1], int)
            and part in ("plugin", "forward", "discard")
        )
    ]
    return loc_to_key(tuple(kept)) if kept else ""


class RuleSet:
    """The compiled rules, in evaluation order."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = sorted(rules, key=lambda r: (-r.model.rank, r.index))

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def get(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    @classmethod
    def compile(
        cls,
        tables: Sequence[Any],
        *,
        destinations: Iterable[str] = (),
        plugins: Iterable[str] = (),
        check_params: Callable[[str, dict[str, Any]], list[tuple[str, str]]] | None = None,
        takes: Callable[[str], str] | None = None,
    ) -> RuleSet:
        """Validate rule tables from the config; raises :class:`RulesError` listing every problem.

        ``tables`` are what the TOML holds: each should be a table (a dict), and one that is not is an error.

        ``check_params(plugin, params)`` returns (field, message) pairs for parameters the plugin refuses.
        ``takes(plugin)`` says what a plugin takes ("series" or "study"): a study plugin needs a study rule.
        """
        dest_settings = dict(destinations) if isinstance(destinations, Mapping) else {}
        destinations, plugins = set(destinations), set(plugins)
        errors: list[str] = []
        rules: list[Rule] = []
        seen: dict[str, int] = {}
        for i, table in enumerate(tables):
            name = table.get("name") if isinstance(table, dict) else None
            where = f'rules[{i}] ("{name}")' if isinstance(name, str) else f"rules[{i}]"
            try:
                model = RuleModel.model_validate(table)
            except ValidationError as e:
                for err in e.errors():
                    text = _TAG_ERRORS.get(err["type"]) or error_text(
                        err, "unknown key (see the rules section of config/node.toml)"
                    )
                    key = _loc(err["loc"])
                    errors.append(f"{where}.{key}: {text}" if key else f"{where}: {text}")
                if isinstance(table, dict) and isinstance(table.get("match", {}), dict):
                    try:  # report the conditions' problems in the same run
                        parse_match(table.get("match", {}))
                    except ConditionError as ce:
                        errors += [f"{where}.{path}: {message}" for path, message in ce.problems]
                continue
            if not _NAME.match(model.name):
                errors.append(f"{where}.name: use letters, digits, '-', '_' or '.' (at most 128), not {model.name!r}")
            if model.name in seen:
                errors.append(f"{where}.name: {model.name!r} is already the name of rules[{seen[model.name]}]")
            seen.setdefault(model.name, i)
            for j, action in enumerate(model.actions):
                a = f"{where}.actions[{j}]"
                targets = (
                    [("send_to", d) for d in action.send_to]
                    if isinstance(action, PluginAction)
                    else [("to", d) for d in action.to]
                    if isinstance(action, ForwardAction)
                    else []
                )
                for key, dest in targets:
                    if dest not in destinations:
                        known = ", ".join(sorted(destinations)) or "none are configured; add a [[destinations]] table"
                        errors.append(f"{a}.{key}: unknown destination {dest!r} (destinations: {known})")
                if isinstance(action, PluginAction) and action.compression is None:
                    wanted = {
                        d: getattr(dest_settings.get(d), "derived_compression", "none")
                        for d in action.send_to
                        if d in dest_settings
                    }
                    if len(set(wanted.values())) > 1:
                        which = ", ".join(f"{d} ({c})" for d, c in wanted.items())
                        errors.append(
                            f"{a}.send_to: the destinations want different encodings of derived objects "
                            f"({which}); set compression on this action or split it into one action "
                            "per destination"
                        )
                if isinstance(action, PluginAction):
                    for k, step in enumerate(action.steps):
                        key = "plugin" if action.plugin else f"plugins[{k}].name"
                        if step.name not in plugins:
                            known = ", ".join(sorted(plugins)) or "none are installed"
                            errors.append(f"{a}.{key}: unknown plugin {step.name!r} (installed: {known})")
                        elif check_params is not None:
                            pkey = "params" if action.plugin else f"plugins[{k}].params"
                            for fld, msg in check_params(step.name, step.params):
                                where_ = f"{a}.{pkey}.{fld}" if fld else f"{a}.{key}"
                                errors.append(f"{where_}: {msg}")
                        if step.name in plugins and takes is not None and model.scope == "series":
                            if takes(step.name) == "study":
                                errors.append(
                                    f'{a}.{key}: plugin {step.name!r} takes a study (takes = "study"): '
                                    f'its rule needs scope = "study" (with inputs naming the series it gets)'
                                )
            errors += _scope_errors(model, where)
            inputs: dict[str, Condition] = {}
            for input_name, table in model.inputs.items():
                try:
                    inputs[input_name] = parse_match(table, f"inputs.{input_name}")
                except ConditionError as e:
                    errors += [f"{where}.{path}: {message}" for path, message in e.problems]
            try:
                condition = parse_match(model.match)
            except ConditionError as e:
                errors += [f"{where}.{path}: {message}" for path, message in e.problems]
                continue
            rules.append(Rule(model, condition, i, inputs))
        if errors:
            raise RulesError(errors)
        return cls(rules)

    @property
    def series_rules(self) -> list[Rule]:
        return [r for r in self.rules if not r.study]

    @property
    def study_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.study]

    def evaluate(self, facts: Mapping[str, Any]) -> list[RuleResult]:
        """Every series rule's answer for a stable series, in evaluation order (stop honoured)."""
        results: list[RuleResult] = []
        stopped_by: str | None = None
        revision = facts.get("revision") or 1
        for rule in self.series_rules:
            if stopped_by is not None:
                results.append(RuleResult(rule, "skipped", f"rule {stopped_by!r} matched first and has stop = true"))
                continue
            if not rule.model.enabled:
                results.append(RuleResult(rule, "disabled", "enabled = false"))
                continue
            out: Outcome = rule.condition.evaluate(facts)
            if not out.ok:
                results.append(RuleResult(rule, "not matched", out.why))
                continue
            if revision > 1 and rule.model.on_revision == "ignore":
                results.append(
                    RuleResult(
                        rule,
                        "not for revisions",
                        f"this is revision {revision} and the rule "
                        'has on_revision = "ignore" (it ran for an earlier revision)',
                    )
                )
                continue
            results.append(RuleResult(rule, "matched"))
            if rule.model.stop:
                stopped_by = rule.name
        return results

    def timing(self, facts: Mapping[str, Any]) -> tuple[float | None, int | None, str]:
        """``(stable_after, expected_instances, rule name)`` from the first rule that may match and sets one.

        Evaluated when a revision opens, from its first instance: conditions on
        counts cannot be known yet and count as satisfied.
        """
        revision = facts.get("revision") or 1
        for rule in self.series_rules:
            m = rule.model
            if not m.enabled or (revision > 1 and m.on_revision == "ignore"):
                continue
            may_match = rule.condition.evaluate(facts, partial=True).ok
            if may_match and (m.stable_after is not None or m.expected_instances is not None):
                return m.stable_after, m.expected_instances, rule.name
            if may_match and m.stop:
                break  # the rules below would be skipped
        return None, None, ""

    @property
    def needs_timing(self) -> bool:
        return any(r.model.stable_after is not None or r.model.expected_instances is not None for r in self.rules)

    def evaluate_study(self, series: Sequence[StudySeries], now: dt.datetime) -> list[StudyResult]:
        """Every study rule's answer for a study whose (received) series are ``series``, in evaluation order.

        With inputs, a rule is ready once each input has a stable series matching it and the rule's
        ``match`` (the newest such series; each input a different one); without, once every series is
        stable, one matches, and no instance arrived for ``study_quiet``. Whether it fired for these
        inputs already is the tracker's question (the study_trigger table).
        """
        return [_evaluate_study_rule(rule, series, now) for rule in self.study_rules]


def _scope_errors(model: RuleModel, where: str) -> list[str]:
    """The keys that do not fit the rule's scope, and a study rule's inputs and actions that cannot work."""
    errors = []
    fields = model.model_fields_set
    if model.scope == "series":
        for key in _STUDY_ONLY:
            if key in fields:
                errors.append(f'{where}.{key}: only a study rule has {key}; add scope = "study"')
        return errors
    for key, why in _SERIES_ONLY.items():
        if key in fields:
            errors.append(f"{where}.{key}: not for a study rule: {why}")
    for name in model.inputs:
        if not _INPUT.match(name):
            errors.append(
                f"{where}.inputs.{name}: name an input with letters, digits, '_' or '-' "
                "(starting with a letter or '_', at most 64)"
            )
    if model.primary is not None and model.primary not in model.inputs:
        known = ", ".join(model.inputs) or "none: declare them as [rules.inputs.<name>] tables"
        errors.append(f"{where}.primary: no input named {model.primary!r} (inputs: {known})")
    if model.inputs and "study_quiet" in fields:
        errors.append(
            f"{where}.study_quiet: a rule with inputs fires as soon as each input is stable; "
            "study_quiet is for a study rule without inputs"
        )
    for j, action in enumerate(model.actions):
        if not isinstance(action, PluginAction):
            errors.append(
                f"{where}.actions[{j}].type: a study rule runs plugins; forward and discard act on one series "
                "(use a series rule for them)"
            )
    return errors


def _assign(fits: Mapping[str, Sequence[StudySeries]]) -> dict[str, StudySeries]:
    """A different series for each input, from the series that fit it (each list newest first).

    One series may fit several inputs (``{Modality = "CT"}`` and ``{ContrastBolusAgent = {exists = true}}``
    both fit a contrast CT), so taking each input's newest fit in turn can take the only series a later
    input fits and wait forever. Instead each input, in declared order, takes its newest fit that still
    leaves a series for every later input (a bipartite matching decides that), so a complete assignment is
    found whenever one exists. Without one, the inputs a largest matching leaves out (the later-declared
    ones) are missing from the answer.
    """
    names = list(fits)
    largest = _matching(names, fits, set())
    if len(largest) < len(names):
        return {name: fits[name][k] for name, k in largest.items()}
    chosen: dict[str, StudySeries] = {}
    taken: set[int] = set()
    for i, name in enumerate(names):
        rest = names[i + 1 :]
        for s in fits[name]:
            if s.series_id not in taken and len(_matching(rest, fits, taken | {s.series_id})) == len(rest):
                chosen[name] = s
                taken.add(s.series_id)
                break
    return chosen


def _matching(names: Sequence[str], fits: Mapping[str, Sequence[StudySeries]], taken: set[int]) -> dict[str, int]:
    """A largest matching of ``names`` to series not in ``taken`` (augmenting paths, inputs in declared
    order): ``{input: index of its series in fits[input]}``."""
    owner: dict[int, tuple[str, int]] = {}  # series id -> (input, index in its fits)

    def augment(name: str, seen: set[int]) -> bool:
        for k, s in enumerate(fits[name]):
            if s.series_id in taken or s.series_id in seen:
                continue
            seen.add(s.series_id)
            if s.series_id not in owner or augment(owner[s.series_id][0], seen):
                owner[s.series_id] = (name, k)
                return True
        return False

    for name in names:
        augment(name, set())
    return dict(owner.values())


def _evaluate_study_rule(rule: Rule, series: Sequence[StudySeries], now: dt.datetime) -> StudyResult:
    m = rule.model
    if not m.enabled:
        return StudyResult(rule, "disabled", "enabled = false")
    arriving = [s for s in series if not s.stable]
    still = f" ({len(arriving)} series of the study still arriving)" if arriving else ""
    stable = [s for s in series if s.stable and s.facts is not None and rule.condition.evaluate(s.facts).ok]
    if rule.inputs:
        fits = {
            name: sorted(
                (s for s in stable if s.facts is not None and condition.evaluate(s.facts).ok),
                key=lambda s: (s.last_received_at, s.series_id),
                reverse=True,
            )
            for name, condition in rule.inputs.items()
        }
        chosen = _assign(fits)
        missing = [name for name in rule.inputs if name not in chosen]
        if missing:
            shared = [name for name in missing if fits[name]]
            why = f"waiting for {', '.join(missing)}{still}"
            if shared:
                why += (
                    f" ({', '.join(shared)}: the series that fit it fit other inputs too, and each input "
                    "takes a series of its own)"
                )
            return StudyResult(rule, "waiting", why, missing=tuple(missing))
        return StudyResult(rule, "ready", "every input is stable", chosen, m.primary or next(iter(chosen)))
    if arriving:
        return StudyResult(rule, "waiting", f"waiting for {len(arriving)} series of the study still arriving")
    if not stable:
        why = "no series of the study matches"
        if series and series[0].facts is not None:
            why += f" (e.g. series {series[0].series_uid}: {rule.condition.evaluate(series[0].facts).why})"
        return StudyResult(rule, "not matched", why)
    quiet = m.study_quiet if m.study_quiet is not None else DEFAULT_STUDY_QUIET
    due = max(s.last_received_at for s in series) + dt.timedelta(seconds=quiet)
    if now < due:
        return StudyResult(
            rule,
            "waiting",
            f"waiting for the study to be quiet: no instance for {quiet:g} s (until {due:%Y-%m-%d %H:%M:%S} UTC)",
            due=due,
        )
    inputs = input_keys(stable, lambda s: s.series_number, lambda s: s.series_uid)
    return StudyResult(rule, "ready", f"no instance in the study for {quiet:g} s", inputs, next(iter(inputs)))
