"""`eval run` over many processes: `torchrun --nproc-per-node 2` and `--shard K/N` on the stand-in simulator
(`standin_sim.py`), with the real tiny checkpoint, loader and torch.distributed (gloo, 2 CPU processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import _proc
import pytest

from openvla_align.eval import load_run
from openvla_align.eval.shard import Ranks
from openvla_align.tiny import save_tiny_checkpoint

from conftest import cli_fails

TESTS = Path(__file__).resolve().parent
ENVS = ["PutOnPlateInScene25Carrot-v1", "PutOnPlateInScene25Plate-v1", "PutOnPlateInScene25Position-v1"]
SEEDS = [0, 1]
PAIRS = {(e, s) for e in ENVS for s in SEEDS}


@pytest.fixture
def setup(tmp_path, vla, tokenizer):
    stats = {"action": {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}}
    vla.config.norm_stats = {"sft": stats}
    save_tiny_checkpoint(tmp_path / "ckpt", vla, tokenizer)
    recipe = tmp_path / "standin.yaml"
    recipe.write_text(
        f"suite: ood\nenvs: {json.dumps(ENVS)}\nseeds: {SEEDS}\nnum_envs: 2\nepisode_len: 3\n"
        "simulator: standin_sim:StandInSim\n"
    )
    return recipe, tmp_path / "ckpt"


def _env(tmp_path, **extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.update(STANDIN_LOG=str(tmp_path / "built.jsonl"), OMP_NUM_THREADS="1", **extra)
    return env


def _eval(recipe, ckpt, out, *extra):
    return [
        "eval",
        "run",
        str(recipe),
        "--vla-path",
        str(ckpt),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        *extra,
    ]


def _torchrun(tmp_path, args, **env):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "--no-python",
        str(Path(sys.executable).parent / "openvla-align"),
        *args,
    ]
    return _proc.run(cmd, env=_env(tmp_path, **env), timeout=600)


def _built(tmp_path):
    log = tmp_path / "built.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def _done(out):
    return {(p.parts[-4], int(p.parts[-2])) for p in Path(out).rglob("result.json")}


def test_torchrun_writes_every_pair_once_and_a_rerun_after_a_dead_rank_finishes_the_rest(setup, tmp_path):
    recipe, ckpt = setup
    out = tmp_path / "out"
    run = _torchrun(tmp_path, _eval(recipe, ckpt, out))
    assert run.returncode == 0, run.stderr[-3000:]
    built = _built(tmp_path)
    assert sorted((b["env"], b["seed"]) for b in built) == sorted(PAIRS)  # every pair exactly once
    assert {b["rank"] for b in built} == {0, 1}
    assert "rank 0/2: 3 evaluated" in run.stdout and "rank 1/2: 3 evaluated" in run.stdout
    assert run.stdout.count("6 evaluated by 2 ranks, 0 already there, 0 missing") == 1  # rank 0's summary only
    assert len(load_run(out).cells) == 6

    # rank 1 dies as it builds its second environment; torchrun then stops rank 0 too
    out2 = tmp_path / "out2"
    crashed = _torchrun(tmp_path, _eval(recipe, ckpt, out2), STANDIN_CRASH="1:2", STANDIN_STEP_S="0.3")
    assert crashed.returncode != 0
    first = _done(out2)
    assert 1 <= len(first) < 6 and all(json.loads(p.read_text()) for p in out2.rglob("result.json"))
    stamps = {p: p.stat().st_mtime_ns for p in out2.rglob("result.json")}
    _built(tmp_path)
    # the re-run, in one process this time, evaluates just the missing pairs
    again = subprocess.run(
        [str(Path(sys.executable).parent / "openvla-align"), *_eval(recipe, ckpt, out2)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert {(b["env"], b["seed"]) for b in _built(tmp_path)} == PAIRS - first
    assert _done(out2) == PAIRS and {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_shards_split_the_pairs_and_together_cover_them(setup, tmp_path, capsys, monkeypatch):
    from openvla_align.cli import main

    recipe, ckpt = setup
    out = tmp_path / "out"
    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "built.jsonl"))
    assert main(_eval(recipe, ckpt, out, "--shard", "1/2")) == 0
    assert "3 evaluated, 0 already there, 0 missing of shard 1/2" in capsys.readouterr().out
    assert len(_done(out)) == 3
    assert main(_eval(recipe, ckpt, out, "--shard", "0/2")) == 0
    assert _done(out) == PAIRS and len(_built(tmp_path)) == 6
    assert main(_eval(recipe, ckpt, out)) == 0  # nothing left: said without loading
    assert "all 6 (env, seed) pairs already evaluated" in capsys.readouterr().out


@pytest.mark.parametrize(
    "shard, message",
    [("3/2", r"K counts from 0 and must be below N \(2\)"), ("0/0", "N must be at least 1"), ("a/2", "is not K/N")],
)
def test_bad_shards_are_usage_errors(setup, capsys, shard, message):
    recipe, ckpt = setup
    cli_fails(capsys, _eval(recipe, ckpt, "out", "--shard", shard), message, status=2)


def test_ranks_split_deterministically_and_never_share_a_gpu():
    pairs = [(e, s) for e in ENVS for s in SEEDS]
    shares = [Ranks.from_env((k, 2)).of_shard(pairs) for k in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(pairs) and not set(shares[0]) & set(shares[1])
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    ranks = Ranks.from_env((0, 1), env)
    assert ranks.of_rank(list(range(5))) == [1, 3] and ranks.device("cuda", 2) == "cuda:1"
    assert ranks.device("cpu", 0) == "cpu"
    with pytest.raises(ValueError, match="every rank on the same GPU: pass --device cuda"):
        ranks.device("cuda:0", 2)
    with pytest.raises(ValueError, match="this node has 1 GPU"):
        ranks.device("cuda", 1)
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        Ranks.from_env((0, 1), {"RANK": "2", "WORLD_SIZE": "2"})
