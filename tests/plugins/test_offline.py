"""The parts of ``plugins run`` and ``plugins new`` that need no plugin process (the whole loop: tests/e2e/plugins/test_author_loop)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from node.plugins.offline import OfflineError, group_series, parse_params
from node.plugins.scaffold import ScaffoldError, module_name, scaffold


def test_files_are_grouped_per_series_and_the_rest_is_named(tmp_path: Path, shared_data: Path) -> None:
    """A folder as copied from a CD: two series, their DICOMDIR, a stray text file and a damaged copy."""
    ct, mr = shared_data / "series" / "ct-head-philips-5mm", shared_data / "series" / "mr-t1-sag-siemens"
    cd = tmp_path / "cd"
    (cd / "a").mkdir(parents=True)
    (cd / "b").mkdir()
    for name in ("DIRFILE", "I10", "I20", "I30"):
        shutil.copy(ct / name, cd / "a" / name)
    mr_files = sorted(p for p in mr.iterdir() if p.is_file() and p.name != "DIRFILE")[:2]
    for p in mr_files:
        shutil.copy(p, cd / "b" / p.name)
    (cd / "README.TXT").write_text("Patient CD viewer")
    (cd / "a" / "I40").write_bytes((ct / "I40").read_bytes()[:-5000])  # pixel data cut short
    series, skipped = group_series([cd])
    assert sorted((s.modality, len(s.files)) for s in series) == [("CT", 3), ("MR", 2)]
    ct_series = next(s for s in series if s.modality == "CT")
    assert ct_series.label() == 'CT series 201 "STD BRAIN 5MM" (3 files)'
    why = {p.name: reason for p, reason in skipped}
    assert set(why) == {"DIRFILE", "README.TXT", "I40"}
    assert "DICOMDIR" in why["DIRFILE"]
    assert "not a DICOM file the node would store" in why["README.TXT"]
    assert "Pixel Data says 524288 bytes but the data set ends" in why["I40"], why["I40"]


def test_outputs_of_an_earlier_run_inside_an_input_folder_are_not_sources(tmp_path: Path, shared_data: Path) -> None:
    """``plugins run NAME . --out out``: the SEG an earlier run left in ./out is not a series to run on."""
    ct = shared_data / "series" / "ct-head-philips-5mm"
    (tmp_path / "out" / "1.2.3").mkdir(parents=True)
    shutil.copy(ct / "I10", tmp_path / "I10")
    shutil.copy(ct / "I20", tmp_path / "out" / "1.2.3" / "seg-000-00000.dcm")  # stands for an output
    series, skipped = group_series([tmp_path], outputs=tmp_path / "out")
    assert [s.files for s in series] == [[tmp_path / "I10"]]
    assert skipped == [
        (tmp_path / "out" / "1.2.3" / "seg-000-00000.dcm", "in the --out folder (outputs of a run, not a source)")
    ]


@pytest.mark.parametrize(
    ("text", "chain", "expected"),
    [
        (None, ["a"], [{}]),
        ('{"lower": 200}', ["a"], [{"lower": 200}]),
        ('[{"lower": 200}, {}]', ["a", "b"], [{"lower": 200}, {}]),
    ],
)
def test_params_are_one_object_per_plugin(text: str | None, chain: list[str], expected: list[dict]) -> None:
    assert parse_params(text, chain) == expected


@pytest.mark.parametrize(
    ("text", "chain", "message"),
    [
        ("{lower: 1}", ["a"], "--params is not JSON"),
        ('{"lower": 1}', ["a", "b"], "a JSON list of 2 objects"),
        ("[{}]", ["a", "b"], "has 1 object(s) for 2 plugin(s) (a, b)"),
        ("3", ["a"], "must be a JSON object"),
    ],
)
def test_params_that_do_not_fit_say_what_to_write(text: str, chain: list[str], message: str) -> None:
    with pytest.raises(OfflineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_params(text, chain)


def test_a_new_package_is_complete_python(tmp_path: Path) -> None:
    made = scaffold("liver-author", tmp_path / "pkg")
    rel = sorted(str(p.relative_to(made.folder)) for p in made.files)
    assert rel == [
        "README.md",
        "liver_author/__init__.py",
        "liver_author/plugin.py",
        "pyproject.toml",
        "tests/test_liver_author.py",
    ]
    for p in made.files:
        text = p.read_text()
        assert "$" not in text, p  # every placeholder filled
        if p.suffix == ".py":
            compile(text, str(p), "exec")
    pyproject = (made.folder / "pyproject.toml").read_text()
    assert '[project.entry-points."dicom_node.plugins"]\nliver-author = "liver_author.plugin:segment"' in pyproject
    assert '@plugin(name="liver-author"' in (made.folder / "liver_author" / "plugin.py").read_text()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Liver", "lowercase letters"),
        ("liver_seg", "lowercase letters"),
        ("-liver", "lowercase letters"),
        ("liver--seg", "lowercase letters"),
        ("x" * 65, "at most 64"),
        ("import", "keyword"),
        ("json", "already importable"),
    ],
)
def test_names_that_cannot_be_a_plugin_package(name: str, message: str) -> None:
    with pytest.raises(ScaffoldError, match=message):
        module_name(name)


def test_names_become_modules() -> None:
    assert module_name("liver-seg2") == "liver_seg2"
