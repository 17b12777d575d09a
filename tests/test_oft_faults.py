"""Crash safety of the patched OpenVLA-OFT script (issue 32): SIGKILL at each point of a save (through the test shim's
``kill_at``), a full disk, then OFT's own resume (``--resume true``; without ``--resume_step`` the run's newest
complete checkpoint). Its own file so that pytest-xdist runs it beside ``tests/test_oft_finetune.py``, whose world
and helpers it shares. Discrete-token runs with one image and a trainable projector: the cheapest OFT mode that
saves a merged model and the projector's AdamW state, whose step count tells whether it was restored."""

import json
from pathlib import Path

import pytest
import test_oft_finetune as oft
from test_oft_finetune import ALIGN, optimizer_steps, run

world = oft.world  # the fixture: a patched OFT checkout, a tiny OFT checkpoint, its data and teacher
pytestmark = oft.pytestmark
TRAIN = [*ALIGN, "--align.freeze_projector", "false", "--use_l1_regression", "false", "--save_freq", "1"]
LATEST_ONLY = ["--save_latest_checkpoint_only", "true"]


def marker(directory: Path) -> dict:
    return json.loads((directory / "checkpoint.json").read_text())


def run_name(runs: Path) -> str:
    (name,) = {p.name.strip(".").removesuffix(".old").removesuffix(".tmp").split("--")[0] for p in runs.iterdir()}
    return name


@pytest.mark.parametrize("point", ["adapter-write", "sidecar-write", "merged-write"])
def test_a_kill_inside_a_save_resumes_from_the_runs_newest_complete_checkpoint(world, point):
    """SIGKILL inside step 2's save: in the LoRA adapter's write, in the sidecar's (OFT's own files written, the
    projector half-written) or in the merged model's. Step 1's checkpoint is untouched and complete, step 2's is a
    hidden staging directory without `checkpoint.json`; `--resume true` without `--resume_step` says it takes step 1
    and continues from it with its projector and AdamW state; the next save replaces the half-written one."""
    proc, _, runs = run(world, f"killed-{point}", *TRAIN, "--max_steps", "2", check=False, kill_at=(point, 2))
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL: no exception handler, no cleanup ran
    exp = run_name(runs)
    first, staged = runs / f"{exp}--1_chkpt", runs / f".{exp}--2_chkpt.tmp"
    assert marker(first)["step"] == 1 and marker(first)["merged"] and optimizer_steps(first) == {2.0}
    assert staged.is_dir() and not (staged / "checkpoint.json").exists() and not (runs / f"{exp}--2_chkpt").exists()
    proc, _, _ = run(world, f"killed-{point}", *TRAIN, "--max_steps", "2", "--resume", "true", vla_path=runs / exp)
    assert f"Resuming from `{first}`, step 1, the newest complete checkpoint of the run" in proc.stdout
    second = runs / f"{exp}--2_chkpt"
    assert marker(second)["step"] == 2
    assert optimizer_steps(second) == {4.0}  # step 1's 2 AdamW steps restored + 2 more (a fresh state would give 2)
    assert sorted(p.name for p in runs.iterdir()) == sorted([exp, first.name, second.name])  # nothing staged left


def test_a_kill_between_the_renames_under_torchrun_finishes_the_rename_and_resumes(world):
    """Two ranks (torchrun, gloo), one checkpoint kept (`--save_latest_checkpoint_only`): rank 0 killed while step
    2's save is between its renames (step 1's checkpoint moved to `.<run>.old`, step 2's complete one still
    `.<run>.tmp`, nothing at `<run>`). `--resume true --vla_path runs/<run>` renames step 2 into place, says so in one
    line, and both ranks continue from step 2; the next save cleans up after itself."""
    args = [*TRAIN, *LATEST_ONLY]
    proc, _, runs = run(world, "between-renames", *args, "--max_steps", "2", nproc=2, check=False,
                        kill_at=("between-renames", 2))  # fmt: skip
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    exp = run_name(runs)
    old, tmp = runs / f".{exp}.old", runs / f".{exp}.tmp"
    assert not (runs / exp).exists() and marker(old)["step"] == 1 and marker(tmp)["step"] == 2
    proc, _, _ = run(world, "between-renames", *args, "--max_steps", "3", "--resume", "true", vla_path=runs / exp,
                     nproc=2)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if "a save was interrupted" in line]
    assert lines == [f"`{tmp}` (step 2) is complete; a save was interrupted before renaming it: now `{runs / exp}`"]
    assert marker(runs / exp)["step"] == 3 and optimizer_steps(runs / exp) == {5.0}  # 3 restored + 2
    assert sorted(p.name for p in runs.iterdir()) == [exp]


def test_a_kill_after_the_renames_resumes_from_the_new_checkpoint(world):
    """Killed right after step 2's renames (one checkpoint kept): `<run>` is step 2, complete, and `.<run>.old`
    (step 1) not yet deleted; resume takes `<run>` without a word about the leftover, which the next save removes."""
    args = [*TRAIN, *LATEST_ONLY]
    proc, _, runs = run(world, "after-renames", *args, "--max_steps", "2", check=False, kill_at=("after-renames", 2))
    assert proc.returncode == -9, proc.stderr[-3000:]
    exp = run_name(runs)
    assert marker(runs / exp)["step"] == 2 and marker(runs / f".{exp}.old")["step"] == 1
    proc, _, _ = run(world, "after-renames", *args, "--max_steps", "3", "--resume", "true", "--resume_step", "2",
                     vla_path=runs / exp)  # fmt: skip
    assert "Resuming from" not in proc.stdout and "interrupted" not in proc.stdout
    assert marker(runs / exp)["step"] == 3 and optimizer_steps(runs / exp) == {5.0}
    assert sorted(p.name for p in runs.iterdir()) == [exp]


def test_a_full_disk_during_a_save_stops_in_one_line_and_keeps_the_earlier_checkpoints(world):
    proc, _, runs = run(world, "disk-full", *TRAIN, "--max_steps", "2", check=False, kill_at=("disk-full", 2))
    assert proc.returncode == 1, proc.stderr[-3000:]
    exp = run_name(runs)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Saving step 2 failed (No space left on device)"), last
    assert last.endswith(f"`--resume true --vla_path {runs / exp}` (the newest complete checkpoint of the run)")
    assert marker(runs / f"{exp}--1_chkpt")["step"] == 1
    assert sorted(p.name for p in runs.iterdir()) == [exp, f"{exp}--1_chkpt"]  # nothing staged left behind


def test_a_wrong_resume_step_or_an_incomplete_checkpoint_is_refused_in_one_line(world):
    """`--resume_step` must be the step the checkpoint holds; a half-written directory is never loaded. Each stops
    before anything is written, naming the complete checkpoint to use."""
    runs = world.root / "disk-full" / "runs"
    if not runs.exists():
        run(world, "disk-full", *TRAIN, "--max_steps", "2", check=False, kill_at=("disk-full", 2))
    exp = run_name(runs)
    first = runs / f"{exp}--1_chkpt"
    for name, step in [("wrong-step", "3"), ("cut", "1")]:
        if name == "cut":
            (first / "lora_adapter" / "adapter_model.safetensors").write_bytes(b"cut short")
        proc, _, new_runs = run(world, f"refused-{name}", *TRAIN, "--max_steps", "4", "--resume", "true",
                                "--resume_step", step, vla_path=first, check=False)  # fmt: skip
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and last.startswith(f"No complete checkpoint `{first}` at step {step}"), last
        assert not new_runs.exists()
    assert "(`lora_adapter/adapter_model.safetensors` has 9 bytes" in last and "the newest complete one is" not in last
