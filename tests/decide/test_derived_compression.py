"""Derived objects are encoded as their destination asks, unless the rule's action says otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError
from node.decide.compile import load_checked_config
from node.jobs.actions import _compression

DESTS = """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
derived_compression = "jpeg2000"
[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = 105
"""


def config(tmp_path: Path, action: str):  # type: ignore[no-untyped-def]
    p = tmp_path / "node.toml"
    p.write_text(
        DESTS
        + f"""
[[rules]]
name = "bone"
actions = [{{ type = "plugin", plugin = "threshold-seg", {action} }}]
"""
    )
    return load_checked_config(p, environ={})


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ('send_to = ["pacs"]', "jpeg2000"),
        ('send_to = ["archive"]', "none"),
        ("send_to = []", "none"),
        ('send_to = ["pacs"], compression = "rle"', "rle"),
        ('send_to = ["pacs", "archive"], compression = "none"', "none"),
    ],
)
def test_the_destination_chooses_unless_the_action_does(tmp_path, action, expected):
    cfg = config(tmp_path, action)
    assert _compression(cfg.ruleset.rules[0].model.actions[0], cfg) == expected


def test_destinations_that_disagree_need_a_choice(tmp_path):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, 'send_to = ["pacs", "archive"]')
    assert (
        'rules[0] ("bone").actions[0].send_to: the destinations want different encodings of derived objects '
        "(pacs (jpeg2000), archive (none))" in str(e.value)
    )
