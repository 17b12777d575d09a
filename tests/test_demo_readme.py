"""The README's demo results are the current code's: written by scripts/demo_readme.py from two recorded runs (1 and
2 torch threads), whose statistics are recomputed here from their per-seed results."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from openvla_align.demo import report
from openvla_align.demo.code import source_fingerprint

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("demo_readme", ROOT / "scripts" / "demo_readme.py")
demo_readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_readme)
RUN, OTHER = (json.loads(p.read_text()) for p in (demo_readme.RUN, demo_readme.OTHER))


def test_readme_block_is_the_scripts_rendering_of_the_recorded_runs():
    readme = (ROOT / "README.md").read_text()
    assert demo_readme.render(RUN, OTHER) in readme
    assert demo_readme.render_summary(RUN) in readme.split("\n## ")[0]  # the first screen's lines
    assert RUN["table"] in readme and RUN["conclusion"] in readme
    assert f"commit {RUN['code']['git']['commit'][:7]}" in readme


def test_recorded_runs_are_of_the_current_code():
    """Changing any module the demo imports without re-running it (and this script) fails here."""
    for run in (RUN, OTHER):
        assert run["code"]["fingerprint"] == source_fingerprint(run["code"]["files"]), (
            "The demo's code changed since docs/demo/ was written: run the two demos and scripts/demo_readme.py "
            "(see its docstring)."
        )
        assert not run["code"]["git"]["dirty"]


@pytest.mark.parametrize("run", [RUN, OTHER], ids=["run", "other"])
def test_statistics_recomputed_from_the_per_seed_results(run):
    summary = report.summarize(run["base"], run["per_seed"])
    coeffs = {"align": run["config"]["coeff"], "strong": run["config"]["strong_coeff"]}
    assert json.loads(json.dumps(summary)) == run["summary"]
    assert report.verdict(summary, coeffs) == run["verdict"]
    assert report.conclusion(summary, coeffs) == run["conclusion"]
    assert report.words(summary) == run["words"]
    assert len(run["config"]["seeds"]) >= 5


def test_one_and_two_threads_give_the_same_verdict():
    assert {RUN["config"]["threads"], OTHER["config"]["threads"]} == {1, 2}
    assert report.words(report.summarize(RUN["base"], RUN["per_seed"])) == report.words(
        report.summarize(OTHER["base"], OTHER["per_seed"])
    )


def _paths(monkeypatch, tmp_path):
    (tmp_path / "docs" / "images").mkdir(parents=True)
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# x\n\n{demo_readme.SUMMARY_BEGIN}\nold\n{demo_readme.SUMMARY_END}\n\n"
        f"{demo_readme.BEGIN}\nold\n{demo_readme.END}\n\nafter\n"
    )
    monkeypatch.setattr(demo_readme, "ROOT", tmp_path)
    monkeypatch.setattr(demo_readme, "RUN", tmp_path / "docs" / "demo" / "run.json")
    monkeypatch.setattr(demo_readme, "OTHER", tmp_path / "docs" / "demo" / "other.json")
    monkeypatch.setattr(demo_readme, "PICTURE", tmp_path / "docs" / "images" / "demo.png")
    return readme


def _out(tmp_path, name, run):
    out = tmp_path / name
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps(run))
    (out / "demo.png").write_bytes(b"png")
    return out


def test_script_writes_block_records_and_picture(monkeypatch, tmp_path):
    readme = _paths(monkeypatch, tmp_path)
    time_log = tmp_path / "time.txt"
    time_log.write_text(
        "\tElapsed (wall clock) time (h:mm:ss or m:ss): 3:07.86\n\tMaximum resident set size (kbytes): 1913152\n"
    )
    a, b = _out(tmp_path, "a", RUN), _out(tmp_path, "b", OTHER)
    assert demo_readme.main([str(a), str(b), "--time-log", str(time_log)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n" + demo_readme.render_summary(RUN) + "\n\n" + demo_readme.BEGIN)
    assert text.endswith(demo_readme.END + "\n\nafter\n")
    assert "in-distribution sorting" in demo_readme.render_summary(RUN)
    assert "188 s wall, 1.82 GiB max RSS" in text and "\nold\n" not in text
    assert json.loads(demo_readme.RUN.read_text())["time_log"]["wall_s"] == pytest.approx(187.86)
    assert demo_readme.PICTURE.read_bytes() == b"png"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["code"].update(fingerprint="0" * 32), "ran other code"),
        (lambda r: r["code"]["git"].update(dirty=True), "uncommitted changes"),
        (lambda r: r["config"].update(threads=2), "same thread count"),
        (lambda r: r["world"].update(pinned=False), "own code paths"),
    ],
)
def test_script_refuses_other_code_dirty_trees_and_one_thread_count(monkeypatch, tmp_path, change, message):
    readme = _paths(monkeypatch, tmp_path)
    before = readme.read_text()
    one, two = sorted((RUN, OTHER), key=lambda r: r["config"]["threads"])
    first = copy.deepcopy(one)
    change(first)
    second = two
    a, b = _out(tmp_path, "a", first), _out(tmp_path, "b", second)
    with pytest.raises(SystemExit, match=message):
        demo_readme.main([str(a), str(b)])
    assert readme.read_text() == before and not demo_readme.RUN.exists() and not demo_readme.PICTURE.exists()


def test_script_refuses_an_unfinished_run(monkeypatch, tmp_path):
    _paths(monkeypatch, tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(SystemExit, match="not a finished demo run"):
        demo_readme.main([str(tmp_path / "a"), str(tmp_path / "a")])
