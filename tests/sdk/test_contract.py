"""The SDK's contract in the node's process: one set of objects behind node.plugins.api, parameters in three
forms behind one interface, and the protocol's encoders on a real series."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import dicom_node_sdk
import jsonschema
import numpy as np
import pytest
import sdk_plugins
from dicom_node_sdk import NoParams, ParamsError, Plugin, plugin
from dicom_node_sdk._info import PluginInfo
from dicom_node_sdk.loading import as_info
from dicom_node_sdk.protocol import (
    ProtocolError,
    code_from_json,
    code_to_json,
    decode_series,
    encode_series,
    recv_message,
    result_from_json,
    result_to_json,
    save_array,
    send_message,
)
from pydantic import BaseModel, Field

import node.plugins.api as node_api


def test_the_node_api_is_the_sdk():
    assert node_api.__all__ == [n for n in dicom_node_sdk.__all__ if n != "__version__"]
    for name in node_api.__all__:
        assert getattr(node_api, name) is getattr(dicom_node_sdk, name), name
    # the node's side moved out of the contract; still importable from both, as before
    assert node_api.PluginInfo is dicom_node_sdk.PluginInfo is PluginInfo
    assert node_api.as_info is dicom_node_sdk.as_info is as_info


@dataclass
class DcParams:
    lower: float = 300
    count: int = 2
    labels: list[str] = field(default_factory=lambda: ["Bone"])
    upper: float | None = None


class PdParams(BaseModel):
    lower: float = 300
    count: int = Field(2, gt=0)
    labels: list[str] = ["Bone"]
    upper: float | None = None


@pytest.mark.parametrize("params", [DcParams, PdParams])
def test_dataclass_and_pydantic_parameters_behave_alike(params):
    info = plugin(name="p", version="1", params=params)(lambda s, p: [])
    value = info.validate_params({"lower": 250, "labels": ["A", "B"]})
    assert (value.lower, value.count, value.labels, value.upper) == (250.0, 2, ["A", "B"], None)
    assert info.dump_params(value) == {"lower": 250.0, "count": 2, "labels": ["A", "B"], "upper": None}
    with pytest.raises(ParamsError) as e:
        info.validate_params({"lower": "high", "labels": ["A", 3], "colour": "red"})
    found = {".".join(map(str, err["loc"])): err["type"] for err in e.value.errors()}
    assert found.keys() >= {"lower", "labels.1"} and found["labels.1"] == "string_type"
    if params is DcParams:  # a dataclass has no "extra" setting: unknown keys are always an error
        assert found["colour"] == "extra_forbidden"
    assert "lower: Input should be a valid number" in str(e.value)
    schema = info.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    # The node checks a remote plugin's parameters against this schema: it must agree with validate_params.
    assert schema["properties"]["lower"]["default"] == 300
    v = jsonschema.Draft202012Validator(schema)
    assert v.is_valid({"lower": 250, "labels": ["A"]}) and not v.is_valid({"lower": "high"})
    assert not v.is_valid({"upper": "x"}) and v.is_valid({"upper": None})


def test_no_parameters_refuse_any_and_a_wrong_params_type_is_refused_at_declaration():
    info = plugin(name="none", version="1", params=None)(lambda s, p: [])
    assert info.params is NoParams and info.dump_params(info.validate_params({})) == {}
    assert info.schema() == {
        "title": "NoParams",
        "type": "object",
        "properties": {},
        "additionalProperties": False,
        "description": "A plugin without parameters: any parameter given is an error.",
    }
    with pytest.raises(ParamsError, match="radius: Extra inputs are not permitted"):
        info.validate_params({"radius": 3})
    with pytest.raises(TypeError, match="must be a dataclass, a pydantic model or None"):
        plugin(name="bad", version="1", params=dict)
    with pytest.raises(ValueError, match="gpu must be one of none, optional, required"):
        plugin(name="bad", version="1", gpu="cuda")


def test_the_fork_per_job_runner_sets_up_a_class_plugin_for_each_job(ct_series):
    calls = []

    class Counting(Plugin):
        name, version = "count", "1"

        def setup(self) -> None:
            calls.append("setup")

        def run(self, series, params):  # type: ignore[no-untyped-def]
            calls.append("run")
            return []

    info = Counting.info()
    assert info.has_setup and not plugin(name="f", version="1")(lambda s, p: []).has_setup
    info.run(ct_series, None)
    info.run(ct_series, None)
    assert calls == ["setup", "run", "setup", "run"]
    calls.clear()
    warm = info.prepare()  # a worker: one instance, set up once
    warm(ct_series, None)
    warm(ct_series, None)
    assert calls == ["setup", "run", "run"]


def test_results_and_codes_survive_the_json_and_npy_round_trip(ct_series, tmp_path):
    original = sdk_plugins.compute(ct_series, sdk_plugins.OrganParams())
    empty = node_api.Segmentation(np.zeros((0, 4, 4), bool), [original[0].segments[0]])
    back = [result_from_json(result_to_json(r, tmp_path, f"r{i}")) for i, r in enumerate([*original, empty])]
    np.testing.assert_array_equal(back[0].masks, original[0].masks)
    assert back[0].segments == list(original[0].segments)
    np.testing.assert_array_equal(back[1].values, original[1].values)
    assert back[1].values.dtype == np.float32
    assert back[3].masks.shape == (0, 4, 4)
    code = node_api.Code("T-D1100", "SRT", "Head", "1.1")
    assert code_from_json(code_to_json(code)) == code and code_to_json(code)[3] == "1.1"
    with pytest.raises(TypeError, match="Python objects"):
        save_array(np.array([None]), tmp_path / "obj.npy")


def test_a_decoded_series_reads_headers_only_when_asked(ct_series, tmp_path):
    remote = decode_series(encode_series(ct_series, tmp_path / "v.npy"))
    np.testing.assert_array_equal(remote.rescaled(), ct_series.rescaled())
    assert remote.spacing == ct_series.spacing and np.allclose(remote.affine, ct_series.affine)
    assert remote.datasets._loaded is None and len(remote.datasets) == 28  # nothing read for voxels and geometry
    assert remote.modality == "CT" and remote.datasets._loaded is None  # the first header only
    assert list(remote.datasets._single) == [0]
    assert "PixelData" not in remote.datasets[0]
    assert [d.SOPInstanceUID for d in remote.datasets] == [d.SOPInstanceUID for d in ct_series.datasets]


def test_voxels_the_node_decoded_into_the_transfer_file_are_not_written_over(ct_series, tmp_path):
    """The node decodes the pixels straight into the .npy it hands over; encoding must keep them, not re-create
    the file under its own mapping (which would zero it)."""
    path = tmp_path / "voxels.npy"
    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(len(ct_series), 512, 512))
    mapped[...] = ct_series.voxels()
    series = node_api.SeriesInput(
        ct_series.datasets,
        ct_series.files,
        _loader=lambda: mapped,
        positions=ct_series.positions,
        orientation=ct_series.orientation,
        pixel_spacing=ct_series.pixel_spacing,
    )
    before = path.stat().st_ino
    remote = decode_series(encode_series(series, path))
    assert path.stat().st_ino == before
    np.testing.assert_array_equal(remote.voxels(), ct_series.voxels())
    np.testing.assert_array_equal(np.load(path), ct_series.voxels())


def test_framing_refuses_what_is_not_a_message():
    a, b = socket.socketpair()
    with a, b:
        send_message(a, {"op": "hello", "text": "Größe"})
        assert recv_message(b) == {"op": "hello", "text": "Größe"}
        a.sendall(b"\x00\x00\x00\x02[]")
        with pytest.raises(ProtocolError, match="JSON list, not an object"):
            recv_message(b)
        a.sendall(b"\x00\x00\x00\x05{")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError, match="in the middle of a message"):
            recv_message(b)
    c, d = socket.socketpair()
    with c, d:
        c.close()
        assert recv_message(d) is None
