"""`eval run`'s results carry what produced them: two models that share a directory name, a changed setting, a
result cut short by a crash, a run directory mixing models -- driven through the CLI on the stand-in simulator
(`standin_sim.py`), with the real tiny checkpoints and loader."""

import json
import os
import shutil
from pathlib import Path

import pytest

from openvla_align.cli import main
from openvla_align.eval import identity, load_run
from openvla_align.tiny import build_tiny_vla, save_tiny_checkpoint

from conftest import cli_fails, install_entry_points

ENVS = ["PutOnPlateInScene25Carrot-v1", "PutOnPlateInScene25Plate-v1"]
STATS = {"action": {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}}


def _model(path: Path, seed: int, tokenizer) -> Path:
    vla = build_tiny_vla(seed=seed, vocab_size=len(tokenizer))
    vla.config.norm_stats = {"sft": STATS, "x": STATS}
    save_tiny_checkpoint(path, vla, tokenizer)
    return path


@pytest.fixture
def setup(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "standin.yaml"
    recipe.write_text(
        f"suite: ood\nenvs: {json.dumps(ENVS)}\nseeds: [0, 1]\nnum_envs: 2\nepisode_len: 2\n"
        "simulator: standin_sim:StandInSim\n"
    )
    a = _model(tmp_path / "runs" / "a" / "merged", 0, tokenizer)
    b = _model(tmp_path / "runs" / "b" / "merged", 1, tokenizer)
    return recipe, a, b


def _args(recipe, model, *extra):
    return ["eval", "run", str(recipe), "--vla-path", str(model), "--device", "cpu", "--dtype", "float32", *extra]


def _run(recipe, model, *extra):
    return main(_args(recipe, model, *extra))


def _no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the VLA was loaded")

    monkeypatch.setattr("openvla_align.vla.checkpoint.load_vla", refuse)


def test_two_models_with_one_directory_name_get_their_own_results(setup, capsys, monkeypatch):
    recipe, a, b = setup
    assert _run(recipe, a) == 0
    assert _run(recipe, b) == 0
    outs = sorted(p.name for p in Path("eval").iterdir())
    fp_a, fp_b = identity.fingerprint(a), identity.fingerprint(b)
    assert fp_a != fp_b and outs == sorted(f"merged-{fp.split(':')[1][:8]}" for fp in (fp_a, fp_b))
    for out, fp in ((f"eval/merged-{fp_a.split(':')[1][:8]}", fp_a), (f"eval/merged-{fp_b.split(':')[1][:8]}", fp_b)):
        run = load_run(out)
        assert len(run.cells) == 4 and len(run.identities) == 1
        result = json.loads(next(Path(out).rglob("result.json")).read_text())
        assert result["identity"]["fingerprint"] == fp and result["identity"]["num_envs"] == 2

    # the same --out for both: model b stops, naming what differs and the way out, before its VLA is loaded
    _no_loading(monkeypatch)
    shared = str(Path("eval") / f"merged-{fp_a.split(':')[1][:8]}")
    before = {p: p.read_bytes() for p in Path(shared).rglob("result.json")}
    message = r"already holds results of another model or setting for 4 of these .*model weights blake2b:.*pass --out"
    cli_fails(capsys, _args(recipe, b, "--out", shared), message)
    assert {p: p.read_bytes() for p in Path(shared).rglob("result.json")} == before

    # a copy of model a elsewhere is the same model: everything is done, said without loading the VLA
    copy = shutil.copytree(a, Path("elsewhere") / "renamed")
    capsys.readouterr()
    assert _run(recipe, copy, "--out", shared) == 0
    assert "all 4 (env, seed) pairs already evaluated for this model and setting (the VLA was not loaded)" in (
        capsys.readouterr().out
    )


def test_a_changed_setting_or_an_old_result_stops_the_run(setup, capsys, monkeypatch):
    recipe, a, _ = setup
    assert _run(recipe, a, "--out", "out") == 0
    _no_loading(monkeypatch)
    cli_fails(capsys, _args(recipe, a, "--out", "out", "--num-envs", "3"), r"num_envs 2 there, 3 now\): pass --out")
    cli_fails(capsys, _args(recipe, a, "--out", "out", "--unnorm-key", "x"), r"unnorm_key 'sft' there, 'x' now")
    # a key the checkpoint lacks stops the run before anything else, the VLA unloaded
    cli_fails(capsys, _args(recipe, a, "--out", "out", "--unnorm-key", "y"), r"'y' is not in .*\(has: \['sft', 'x'\]\)")
    old = Path("out") / ENVS[0] / "test" / "0" / "result.json"
    data = json.loads(old.read_text())
    del data["identity"]
    old.write_text(json.dumps(data))
    cli_fails(capsys, _args(recipe, a, "--out", "out"), r"for 1 of these .*written before openvla-align recorded")


def test_a_result_cut_short_by_a_crash_is_evaluated_again(setup, capsys, caplog):
    recipe, a, _ = setup
    assert _run(recipe, a, "--out", "out") == 0
    cut = Path("out") / ENVS[1] / "test" / "1" / "result.json"
    cut.write_text(cut.read_text()[:40])
    cut_run = load_run("out")  # listed as a problem, never read as a success rate
    assert len(cut_run.cells) == 3 and any("not valid JSON" in p for p in cut_run.problems)
    others = {p: p.stat().st_mtime_ns for p in Path("out").rglob("result.json") if p != cut}
    capsys.readouterr()
    assert _run(recipe, a, "--out", "out") == 0
    assert "1 evaluated, 3 already there, 0 missing" in capsys.readouterr().out
    assert caplog.text.count("cut short by a crash") == 1  # planned once, not again inside the run
    assert {p: p.stat().st_mtime_ns for p in others} == others and len(load_run("out").cells) == 4


def test_report_refuses_to_average_a_directory_of_two_models(setup, capsys):
    recipe, a, b = setup
    assert _run(recipe, a, "--out", "out") == 0
    assert _run(recipe, b, "--out", "other") == 0
    src = Path("other") / ENVS[1] / "test" / "1" / "result.json"
    shutil.copyfile(src, Path("out") / ENVS[1] / "test" / "1" / "result.json")  # a hand-merged directory
    cli_fails(capsys, ["eval", "report", "out"], r"holds results of 2 different models or settings \(3 like .*, 1 like")


def test_fingerprint_follows_the_weights_not_the_path(tmp_path, tokenizer):
    a = _model(tmp_path / "a", 0, tokenizer)
    moved = Path(shutil.copytree(a, tmp_path / "b"))
    assert identity.fingerprint(a) == identity.fingerprint(moved)
    weights = identity.weight_files(moved)[0]
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(raw))
    assert identity.fingerprint(a) != identity.fingerprint(moved)
    big = tmp_path / "big" / "model.safetensors"  # sampled blocks past 4 MiB: a change inside one is seen
    big.parent.mkdir()
    big.write_bytes(os.urandom(9 << 20))
    first = identity.fingerprint(big.parent)
    raw = bytearray(big.read_bytes())
    span = len(raw) - 2 * identity.HEAD_TAIL - identity.BLOCK
    raw[identity.HEAD_TAIL + 16 * span // (identity.BLOCKS - 1) + 10] ^= 1  # inside the 17th sampled block
    big.write_bytes(bytes(raw))
    assert identity.fingerprint(big.parent) != first
    with pytest.raises(FileNotFoundError, match="holds no weight files"):
        identity.fingerprint(tmp_path)


def test_a_recipe_names_its_simulator(monkeypatch, tmp_path):
    from openvla_align.eval import simulators
    from openvla_align.eval.libero import LiberoEnv
    from openvla_align.eval.simpler import SimplerEnv

    assert simulators.resolve("simpler") is SimplerEnv  # this package's own entry points
    assert simulators.resolve("libero") is LiberoEnv
    assert simulators.resolve("standin_sim:StandInSim").__name__ == "StandInSim"
    install_entry_points(tmp_path, monkeypatch, simulators.ENTRY_POINT_GROUP, {"standin": "standin_sim:StandInSim"})
    assert simulators.resolve("standin").__name__ == "StandInSim"  # an installed package's entry point
    with pytest.raises(ValueError, match="unknown simulator 'mujoco': known libero, simpler, standin"):
        simulators.resolve("mujoco")
    with pytest.raises(ValueError, match="cannot import standin_sim:Nope"):
        simulators.resolve("standin_sim:Nope")
