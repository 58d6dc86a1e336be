"""The actions a job carries: validated as a rule's action, stored as JSON with the job and read back the same."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from node.jobs.spec import Action, DiscardAction, ForwardAction, PluginAction, PluginStep

ACTION: TypeAdapter[PluginAction | ForwardAction | DiscardAction] = TypeAdapter(Action)


@pytest.mark.parametrize(
    ("raw", "kind", "summary"),
    [
        ({"type": "forward", "to": ["pacs", "archive"]}, ForwardAction, "forward the series to pacs, archive"),
        ({"type": "discard", "priority": "urgent"}, DiscardAction, "discard the series (urgent)"),
        (
            {"type": "plugin", "plugin": "threshold-seg", "params": {"low": 300}, "send_to": ["pacs"], "gpu": "none"},
            PluginAction,
            "run threshold-seg, send results to pacs, gpu none",
        ),
        (
            {"type": "plugin", "plugins": [{"name": "threshold-seg"}, {"name": "distance-map"}], "priority": "urgent"},
            PluginAction,
            "run threshold-seg then distance-map (urgent)",
        ),
    ],
)
def test_each_action_type_round_trips_through_its_stored_json(raw: dict, kind: type, summary: str) -> None:
    action = ACTION.validate_python(raw)
    assert type(action) is kind and action.summary() == summary
    stored = action.model_dump(mode="json")  # what the tracker stores as the job's action
    assert ACTION.validate_python(stored) == action


def test_one_plugin_is_a_chain_of_one_step() -> None:
    one = ACTION.validate_python({"type": "plugin", "plugin": "threshold-seg", "params": {"low": 300}})
    assert isinstance(one, PluginAction)
    assert one.steps == [PluginStep(name="threshold-seg", params={"low": 300})]
    assert one.series_number == 9000 and one.unknown_labels == "error" and not one.keep_empty_frames


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (
            {"type": "plugin"},
            'give either plugin = "name" \\(with params\\) or plugins = \\[\\{ name = ... \\}, ...\\]',
        ),
        ({"type": "plugin", "plugin": "a", "plugins": [{"name": "b"}]}, "give either plugin"),
        (
            {"type": "plugin", "plugins": [{"name": "b"}], "params": {"x": 1}},
            "with plugins = \\[...\\], give each plugin's params inside its own table",
        ),
        ({"type": "forward", "to": []}, "to\n  List should have at least 1 item"),
        ({"type": "forward", "to": ["pacs"], "priority": "high"}, "priority\n  Input should be 'normal' or 'urgent'"),
        ({"type": "discard", "to": ["pacs"]}, "discard.to\n  Extra inputs are not permitted"),
        ({"type": "plugin", "plugin": "a", "timeout": 0}, "timeout\n  Input should be greater than 0"),
        ({"type": "plugin", "plugin": "a", "segment_template": "/no/such/metainfo.json"}, "/no/such/metainfo.json"),
        ({"type": "archive"}, "does not match any of the expected tags: 'plugin', 'forward', 'discard'"),
    ],
)
def test_a_wrong_action_says_what_to_change(raw: dict, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        ACTION.validate_python(raw)


def test_actions_are_frozen() -> None:
    action = ACTION.validate_python({"type": "forward", "to": ["pacs"]})
    with pytest.raises(ValidationError, match="frozen"):
        action.to = ["elsewhere"]  # type: ignore[misc]
