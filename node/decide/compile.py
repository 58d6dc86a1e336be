"""Compiling the configured rules: what turns a validated config into the rules the node runs.

Loading the config (:mod:`node.config`) checks only its own tables, so that it imports nothing of the
node. Compiling needs the rest: the segment templates of command plugins are read, the installed and
configured plugins discovered, each rule's plugin parameters checked by the plugin itself, and the
rules compiled against the destinations. Every problem is a :class:`~node.config.ConfigError` in the
words of the config (``invalid configuration/plugins/rules in <file>``), raised before the node
listens or a ``rules`` command answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from node.config import Config, ConfigError, error_text, format_errors, load_config, loc_to_key
from node.decide.rules import RulesError, RuleSet
from node.derive.template import TemplateError, load_template
from node.jobs.spec import PluginAction
from node.plugins.api import ParamsError
from node.plugins.registry import PluginLoadError, PluginRef, describe, discover
from node.plugins.registry import check_params as check


def load_checked_config(path: Path | str | None = None, environ: dict[str, str] | None = None) -> Config:
    """The configuration with its rules compiled (``cfg.ruleset``): what ``run`` and the CLI use."""
    cfg = load_config(path, environ)
    cfg.ruleset = compile_rules(cfg)
    return cfg


def compile_rules(cfg: Config, source: str = "") -> RuleSet:
    """The config's rules, checked against its destinations, its command plugins and the installed plugins.

    ``source`` names where the config came from in messages (default: ``cfg.source``).
    """
    source = source or cfg.source
    # Every problem of the file in one error: a bad template does not hide the rules' mistakes.
    problems: list[str] = []
    try:
        check_command_templates(cfg, source)
    except ConfigError as e:
        problems.append(str(e))
    try:
        plugins = discover(cfg.plugins)
    except PluginLoadError as e:  # the rules name plugins: they cannot be checked without them
        raise ConfigError("\n".join([*problems, f"invalid plugins in {source}: {e}"])) from None
    try:
        ruleset = RuleSet.compile(
            cfg.rules,
            destinations={d.name: d for d in cfg.destinations},
            plugins=plugins,
            check_params=lambda name, params: _param_problems(cfg, plugins[name], params),
            takes=lambda name: _takes(cfg, plugins[name]),
        )
    except RulesError as e:
        problems += [f"invalid rules in {source}:"] + [f"  {line}" for line in e.errors]
        raise ConfigError("\n".join(problems)) from None
    problems += _prior_problems(cfg, ruleset, plugins, source)
    if problems:
        raise ConfigError("\n".join(problems))
    return ruleset


def _prior_problems(cfg: Config, ruleset: RuleSet, plugins: Mapping[str, PluginRef], source: str) -> list[str]:
    """A plugin action's ``priors``: ``from`` must name a [[sources]] entry (node.qr.priors asks it), and its
    plugins must run in the node's own Python (the priors do not reach an environment's worker or a command)."""
    known = {s.name for s in cfg.sources}
    problems = []
    for i, rule in enumerate(ruleset):
        for j, action in enumerate(rule.model.actions):
            if not isinstance(action, PluginAction) or action.priors is None:
                continue
            wanted = action.priors
            where = f'  rules[{i}] ("{rule.name}").actions[{j}].priors'
            if wanted.source not in known:
                names = ", ".join(sorted(known)) or "none are configured; add a [[sources]] table"
                problems.append(f"{where}.from: unknown source {wanted.source!r} (sources: {names})")
            for step in action.steps:
                ref = plugins.get(step.name)
                if ref is not None and ref.kind != "local":
                    runs = f"in environment {ref.environment!r}" if ref.kind == "environment" else "as a command"
                    problems.append(
                        f"{where}: plugin {step.name!r} runs {runs}; priors reach only plugins that run in the "
                        "node's own Python"
                    )
    return [f"invalid rules in {source}:", *problems] if problems else []


def check_command_templates(cfg: Config, source: str) -> None:
    """Each command plugin's ``metainfo`` must be a segment template the node can apply to its label maps."""
    problems = []
    for name, command in cfg.plugins.commands.items():
        if command.metainfo is None:
            continue
        try:
            load_template(command.metainfo)
        except TemplateError as e:
            problems.append((f"plugins.commands.{name}.metainfo", f"{e} (got {str(command.metainfo)!r})"))
    if problems:
        raise ConfigError(format_errors(source, problems))


def _takes(cfg: Config, ref: PluginRef) -> str:
    """What a plugin takes ("series" or "study"); one that cannot be loaded is reported by its parameter check."""
    try:
        return describe(ref, cfg.plugins).takes
    except PluginLoadError:
        return "series"


def _param_problems(cfg: Config, ref: PluginRef, params: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, message) for each problem with a plugin's parameters; loading the plugin checks it too."""
    try:
        return check(describe(ref, cfg.plugins), params)
    except PluginLoadError as e:
        return [("", str(e))]
    except ParamsError as e:  # the plugin's own check (pydantic or dataclass), one entry per problem
        return [(loc_to_key(tuple(err["loc"])), error_text(err)) for err in e.errors()]
