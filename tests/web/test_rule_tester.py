"""The rule tester's reading of a rule (node.web.tester) and lineage's plugin-version filter (node.index.lineage).

What a user relies on: a rule is taken as written (``[[rules]]`` tables or one rule's keys), every mistake
is named by its key as ``rules check`` names it, and the config the node runs with is not changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import Config, load_config
from node.index.lineage import made_with
from node.web.tester import RuleTestError, compile_test_rules, rule_tables

RULE = """
[[rules]]
name = "ct-chest"
[rules.match]
Modality = "CT"
[[rules.actions]]
type = "forward"
to = ["pacs"]
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 11112\n'
        '[[rules]]\nname = "configured"\nmatch = { Modality = "MR" }\nactions = [{ type = "forward", to = ["pacs"] }]\n'
    )
    return load_config(path)


def test_rules_tables_and_a_bare_rule_are_both_read() -> None:
    assert rule_tables(RULE)[0]["name"] == "ct-chest"
    bare = rule_tables(RULE.replace("[[rules]]\n", "").replace("rules.", ""))
    assert bare == rule_tables(RULE)
    two = rule_tables(RULE + RULE.replace("ct-chest", "second"))
    assert [t["name"] for t in two] == ["ct-chest", "second"]


@pytest.mark.parametrize(
    "text, error",
    [
        ('name = "x"\nmatch = {', "not valid TOML: "),
        ("", "no rule: write a [[rules]] table"),
        ('[node]\nport = 1\n[[rules]]\nname = "x"\n', "only rules are tested here: remove node"),
        ('rules = "x"\n', "rules: write each rule as a [[rules]] table"),
    ],
)
def test_text_that_is_no_rule_says_what_to_write(text: str, error: str) -> None:
    with pytest.raises(RuleTestError) as e:
        rule_tables(text)
    assert e.value.errors[0].startswith(error), e.value.errors


def test_the_rule_is_compiled_against_the_config_and_the_config_is_unchanged(cfg: Config) -> None:
    ruleset = compile_test_rules(cfg, rule_tables(RULE))
    assert [r.name for r in ruleset] == ["ct-chest"]
    assert [r["name"] for r in cfg.rules] == ["configured"]
    wrong = RULE.replace('to = ["pacs"]', 'to = ["nowhere"]').replace(
        'Modality = "CT"', 'Modality = "CT"\nBodyPart = "X"'
    )
    with pytest.raises(RuleTestError) as e:
        compile_test_rules(cfg, rule_tables(wrong))
    text = "\n".join(e.value.errors)
    assert e.value.errors[0] == "invalid rules in the rule tester:"
    assert 'rules[0] ("ct-chest").match.BodyPart' in text and "'BodyPart' is not a DICOM keyword" in text
    assert 'rules[0] ("ct-chest").actions[0].to' in text and "nowhere" in text
    assert [r["name"] for r in cfg.rules] == ["configured"]


@pytest.mark.parametrize(
    "wanted, made",
    [
        ("1.0", True),
        ("threshold-seg 1.0", True),
        ("threshold-seg==1.0", True),
        ("segment-stats==0.2", True),
        ("0.2", True),
        ("1.1", False),
        ("threshold-seg 0.2", False),
        ("threshold", False),
    ],
)
def test_plugin_version_filter(wanted: str, made: bool) -> None:
    assert made_with("threshold-seg 1.0, segment-stats 0.2", wanted) is made
    assert made_with("", wanted) is False
