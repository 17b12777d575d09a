"""Crash safety of the patched OpenVLA script (issue 32): SIGKILL at each point of a save (through the test shim's
``kill_at``), a full disk, then resume. Its own file so that pytest-xdist runs it beside
``tests/test_upstream_finetune.py``, whose world and helpers it shares."""

import json
from pathlib import Path

import pytest
import test_upstream_finetune as e2e
from test_upstream_finetune import ALIGN, finetune

world = e2e.world  # the fixture: a patched checkout, a tiny OpenVLA, its data and teacher (built for this module)
pytestmark = pytest.mark.skipif(not e2e._OK, reason=e2e._WHY)


def test_a_kill_between_the_renames_of_a_save_loses_nothing_and_resume_finds_the_newest_complete(world):
    """SIGKILL while step 4's save is between its two renames (the step-2 checkpoint moved to `.<run>.old`, step 4's
    complete one still `.<run>.tmp`): `--resume_from runs/<run>` says so in one line and continues from step 4."""
    cwd = world["root"] / "killed"
    args = ("--max_steps", "4", "--save_steps", "2", "--merge_on_save", "false", *ALIGN)
    proc, _ = finetune(world, cwd, *args, check=False, kill_at=("between-renames", 2))
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL: no exception handler, no cleanup ran
    (exp,) = {p.name.strip(".").removesuffix(".old").removesuffix(".tmp") for p in (cwd / "runs").iterdir()}
    run, old, tmp = (cwd / "runs" / name for name in (exp, f".{exp}.old", f".{exp}.tmp"))
    assert not run.exists()
    markers = {d.name: json.loads((d / "checkpoint.json").read_text())["step"] for d in (old, tmp)}
    assert markers == {old.name: 2, tmp.name: 4}  # both complete: nothing was lost
    projector = (tmp / "align" / "projector.safetensors").read_bytes()
    proc, _ = finetune(world, cwd, *args[:1], "6", *args[2:], "--resume_from", str(Path("runs") / exp))
    lines = [line for line in proc.stdout.splitlines() if "is not a complete checkpoint" in line]
    assert len(lines) == 1 and f"resuming from `runs/.{exp}.tmp`, step 4" in lines[0], proc.stdout[-2000:]
    assert "after gradient step 4" in proc.stdout
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 6
    assert (run / "align" / "projector.safetensors").read_bytes() == projector  # the same frozen projector
    assert not old.exists() and not tmp.exists()  # the next save cleaned up after itself


@pytest.mark.parametrize(
    "point, resumes_at",
    [("adapter-write", 2), ("sidecar-write", 2), ("after-renames", 4)],
)
def test_a_kill_at_any_point_of_a_save_resumes_from_the_last_complete_checkpoint(world, point, resumes_at):
    """SIGKILL inside step 4's adapter or sidecar write (step 2's checkpoint untouched in place, a half-written
    staging directory beside it) or just after its renames (step 4 in place, `.old` not yet deleted):
    `--resume_from runs/<run>` continues from the last complete checkpoint, with its projector, and says nothing."""
    cwd = world["root"] / f"killed-{point}"
    args = ("--max_steps", "4", "--save_steps", "2", "--merge_on_save", "false", *ALIGN)
    proc, _ = finetune(world, cwd, *args, check=False, kill_at=(point, 2))
    assert proc.returncode == -9, proc.stderr[-3000:]
    (exp,) = {p.name.strip(".").removesuffix(".old").removesuffix(".tmp") for p in (cwd / "runs").iterdir()}
    run = cwd / "runs" / exp
    assert json.loads((run / "checkpoint.json").read_text())["step"] == resumes_at
    if point.endswith("-write"):  # the half-written save is beside it, never taken for a checkpoint
        assert not (cwd / "runs" / f".{exp}.tmp" / "checkpoint.json").exists()
    projector = (run / "align" / "projector.safetensors").read_bytes()
    proc, _ = finetune(world, cwd, *args[:1], "6", *args[2:], "--resume_from", str(Path("runs") / exp))
    assert f"after gradient step {resumes_at}" in proc.stdout and "is not a complete checkpoint" not in proc.stdout
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 6
    assert (run / "align" / "projector.safetensors").read_bytes() == projector
    assert [p.name for p in (cwd / "runs").iterdir()] == [exp]  # no leftovers after the next save


def test_a_full_disk_during_a_save_stops_in_one_line_and_keeps_the_previous_checkpoint(world):
    cwd = world["root"] / "disk-full"
    args = ("--max_steps", "4", "--save_steps", "2", "--merge_on_save", "false", *ALIGN)
    proc, _ = finetune(world, cwd, *args, check=False, kill_at=("disk-full", 2))
    assert proc.returncode == 1, proc.stderr[-3000:]
    (exp,) = [p.name for p in (cwd / "runs").iterdir()]  # no staging directory left behind
    run = cwd / "runs" / exp
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("Saving step 4 failed (No space left on device)")
        and f"--resume_from {Path('runs') / exp}" in last
    )
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 2  # step 2's checkpoint, complete


def test_a_kill_during_the_merge_keeps_the_adapter_and_resume_latest_continues_from_it(world):
    """Stock save mode (a merged model on every save), resumed from an adapter-only checkpoint so that its saves keep
    `trainer_state.pt` beside the adapter: SIGKILL inside step 4's merged-model write. Step 4's adapter is complete
    in `adapters/<run>` (committed before the merge), the merged model half-written in `runs/.<run>.tmp`, never in
    place; `--resume_from latest` continues from step 4's adapter and the next save puts a whole merged model in
    place and removes the half-written one."""
    base = world["root"] / "merge-base"
    args = ("--save_steps", "2", *ALIGN)
    finetune(world, base, "--max_steps", "2", "--merge_on_save", "false", *args)
    (exp,) = [p.name for p in (base / "runs").iterdir()]
    cwd = world["root"] / "merge-killed"
    resume = ("--resume_from", str(base / "runs" / exp))
    proc, _ = finetune(world, cwd, "--max_steps", "6", *args, *resume, check=False, kill_at=("merged-write", 1))
    assert proc.returncode == -9, proc.stderr[-3000:]
    adapter, run, staged = cwd / "adapters" / exp, cwd / "runs" / exp, cwd / "runs" / f".{exp}.tmp"
    assert json.loads((adapter / "checkpoint.json").read_text())["step"] == 4
    assert (staged / "model.safetensors").is_file() and not (run / "model.safetensors").exists()
    projector = (adapter / "align" / "projector.safetensors").read_bytes()
    proc, _ = finetune(world, cwd, "--max_steps", "6", *args, "--resume_from", "latest")
    assert "after gradient step 4" in proc.stdout, proc.stdout[-2000:]
    assert json.loads((adapter / "checkpoint.json").read_text())["step"] == 6
    assert (adapter / "align" / "projector.safetensors").read_bytes() == projector  # the same frozen projector
    assert (run / "model.safetensors").is_file() and (run / "config.json").is_file()
    assert sorted(p.name for p in (cwd / "runs").iterdir()) == [exp]  # the half-written merge is gone
