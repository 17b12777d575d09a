"""`openvla-align eval report` against a hand-computed table, from result files in both layouts.

The fixture: run `align` in openvla-align's layout (`result.json`, per-episode successes, 4 episodes per seed) and
run `sft` in the reference implementation's layout (`stats.yaml`, `succes_once` as a string). `align` lacks the
Position environment and one VisionImage seed; both must show up under Problems.
"""

import json
import math
import statistics

import pytest
import yaml

from openvla_align.cli import main
from openvla_align.eval import load_run, write_result
from openvla_align.eval.report import build_report, markdown
from openvla_align.stats import wilcoxon_greater

from conftest import cli_fails

P = "PutOnPlateInScene25"
CARROT, PLATE, VIMG, POS = (f"{P}{n}-v1" for n in ("Carrot", "Plate", "VisionImage", "Position"))
SHAPE = "PutOnShapeInSceneMultiColor-v1"
ALIGN = {CARROT: [0.5, 0.75, 1.0], PLATE: [0.25, 0.5, 0.25], VIMG: [1.0, 0.5], SHAPE: [0.25, 0.25, 0.5]}
SFT = {
    CARROT: [0.25, 0.5, 0.5],
    PLATE: [0.25, 0.25, 0.0],
    VIMG: [0.5, 0.5, 0.25],
    POS: [0.5] * 3,
    SHAPE: [0, 0.25, 0.25],
}


def write_fixture(root):
    for env, rates in ALIGN.items():
        for seed, rate in enumerate(rates):
            k = round(rate * 4)
            write_result(root / "align", env, "test", seed, [True] * k + [False] * (4 - k))
    for env, rates in SFT.items():
        for seed, rate in enumerate(rates):
            d = root / "sft" / env / "test" / str(seed)
            d.mkdir(parents=True)
            stats = {"env_name": env, "succes_once": str(rate), "instruction": {i: "put" for i in range(4)}}
            (d / "stats.yaml").write_text(yaml.dump(stats))
    return root / "align", root / "sft"


@pytest.fixture
def runs(tmp_path):
    align, sft = write_fixture(tmp_path)
    return load_run(align), load_run(sft)


def test_both_layouts_load(runs):
    align, sft = runs
    assert align.cells[(CARROT, "test", "1")] == 0.75 and align.episodes[(CARROT, "test", "1")] == 4
    assert sft.cells[(PLATE, "test", "2")] == 0.0 and sft.episodes[(PLATE, "test", "2")] == 4
    assert align.envs() == sorted(ALIGN) and sft.envs() == sorted(SFT)


def test_hand_computed_tables(runs):
    align, sft = runs
    report = build_report([sft, align], baseline=sft)
    c = report.cells
    assert (c[("align", CARROT)].mean, c[("align", CARROT)].sd) == pytest.approx((0.75, 0.25))
    assert (c[("sft", CARROT)].mean, c[("sft", CARROT)].sd) == pytest.approx((5 / 12, 0.1443376))
    assert c[("align", VIMG)].n == 2 and c[("align", VIMG)].short and not c[("sft", VIMG)].short
    assert c[("align", VIMG)].sd == pytest.approx(math.sqrt(0.125))
    # per axis: the mean of the environments present (Semantic: Carrot and Plate of five)
    assert report.axes[("align", "Semantic")] == pytest.approx((0.75 / 2 + 1 / 6, 2))
    assert report.axes[("sft", "Semantic")] == pytest.approx((5 / 24 + 1 / 12, 2))
    assert report.axes[("sft", "Execution")] == (0.5, 1) and ("align", "Execution") not in report.axes
    # Semantic pairs (baseline - run): -.25 -.25 -.5 | 0 (dropped) -.25 -.25 -> n=5, W+=0, ties -> normal
    # approximation: mean 7.5, var 5*6*11/24 - (4^3-4)/48 = 12.5, z = -7.5/sqrt(12.5) -> p = Phi(2.1213) = 0.98305
    sem = report.tests[("align", "Semantic")]
    assert (sem["pairs"], sem["n"], sem["w_plus"], sem["method"]) == (6, 5, 0.0, "normal")
    assert sem["p"] == pytest.approx(0.5 * math.erfc(-7.5 / math.sqrt(12.5) / math.sqrt(2)))
    assert sem["p"] == pytest.approx(0.98305, abs=1e-5)
    vis = report.tests[("align", "Vision")]  # seeds 0 and 1 only; seed 1 ties -> one pair, exact p = 1
    assert (vis["pairs"], vis["n"], vis["p"], vis["method"]) == (2, 1, 1.0, "exact")
    assert ("align", "Execution") not in report.tests
    assert report.problems == [
        "align: no results for Position (other runs have them)",
        "align: VisionImg lacks seed(s) 2",
    ]
    text = markdown(report)
    assert "| align | 0.75 ± 0.25 | 0.33 ± 0.14 | 0.75 ± 0.35* | – |" in text
    assert "| sft | 0.292 (2/5) | 0.417 (1/5) | 0.500 (1/3) |" in text
    assert "| align | 0.983 (6) | 1 (2) | – |" in text
    assert "| align | 0.33 ± 0.14 |" in text  # VL-Think Shape
    assert statistics.fmean(ALIGN[SHAPE]) == pytest.approx(1 / 3)


def test_wilcoxon_matches_scipy():
    """Where the conventions agree: exact without ties (n <= 50), normal approximation with ties for large n."""
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy cross-check (installed with the test extra)")
    import numpy as np

    rng = np.random.default_rng(0)
    for n in (4, 9, 20, 50):
        x, y = rng.normal(0.6, 0.1, n), rng.normal(0.55, 0.1, n)
        ours = wilcoxon_greater(x.tolist(), y.tolist())
        assert ours["method"] == "exact"
        assert ours["p"] == pytest.approx(scipy_stats.wilcoxon(x, y, alternative="greater").pvalue, rel=1e-9)
    for n in (64, 128):  # success rates over 128 parallel envs: many ties
        x, y = rng.integers(40, 100, n) / 128, rng.integers(30, 90, n) / 128
        ours = wilcoxon_greater(x.tolist(), y.tolist())
        assert ours["method"] == "normal"
        assert ours["p"] == pytest.approx(scipy_stats.wilcoxon(x, y, alternative="greater").pvalue, rel=1e-9)


def test_duplicates_and_unreadable_files_are_reported(tmp_path):
    align, sft = write_fixture(tmp_path)
    (sft / PLATE / "test" / "1" / "result.json").write_text(json.dumps({"episodes": [True]}))  # two files, one seed
    (sft / CARROT / "test" / "2" / "stats.yaml").write_text("just text")
    copy = tmp_path / "align-copy"
    import shutil

    shutil.copytree(align, copy)
    runs = [load_run(align), load_run(sft), load_run(copy), load_run(align)]
    problems = build_report(runs).problems
    assert any("holds both result.json and stats.yaml; used result.json" in p for p in problems)
    assert any("unreadable" in p and "succes_once" in p for p in problems)
    assert any(p == "duplicate run label 'align': 2 runs share it; rename one directory" for p in problems)
    assert any(p.startswith("duplicate run: ") and str(align.resolve()) in p for p in problems)
    assert any("'align' and 'align-copy' hold identical results" in p for p in problems)
    with pytest.raises(FileNotFoundError, match="No results under"):
        load_run(tmp_path / "align" / CARROT)


def test_cli_writes_markdown_csv_and_charts(tmp_path, capsys):
    align, sft = write_fixture(tmp_path)
    out = tmp_path / "report"
    assert main(["eval", "report", str(align), "--baseline", str(sft), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## Problems" in printed and "VisionImg lacks seed(s) 2" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "axes.csv",
        "environments.csv",
        "execution.png",
        "report.md",
        "semantic.png",
        "vision.png",
        "vlthink.png",
        "wilcoxon.csv",
    ]
    rows = (out / "wilcoxon.csv").read_text().splitlines()
    assert rows[0] == "run,baseline,axis,pairs,nonzero,w_plus,p,method"
    assert rows[1].startswith("align,sft,Semantic,6,5,0,0.98305")
    envs = (out / "environments.csv").read_text()
    assert f"align,{VIMG},Vision,0.75,0.353553,2,1" in envs
    cli_fails(capsys, ["eval", "report", str(tmp_path / "missing")], "not a directory")
