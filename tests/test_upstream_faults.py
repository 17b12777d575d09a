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


def test_a_kill_at_each_point_of_a_save_loses_nothing_and_resume_finds_the_newest_complete(world):
    """One adapter-only run killed (SIGKILL) inside step 4's save at each point in turn, each resume the next kill's
    run: inside the adapter write and inside the sidecar write (step 2's checkpoint untouched in place, a
    half-written `.<run>.tmp` beside it: resumed from step 2 without a word), between the two renames (step 2 moved
    to `.<run>.old`, step 4's complete one still `.<run>.tmp`: moved into place in one line, resumed from step 4),
    just after them (step 6 in place, `.old` not yet deleted: resumed from step 6). The frozen projector is the same
    throughout and the last save leaves no leftovers."""
    cwd = world["root"] / "killed"
    args = ("--save_steps", "2", "--merge_on_save", "false", *ALIGN)
    proc, _ = finetune(world, cwd, "--max_steps", "4", *args, check=False, kill_at=("adapter-write", 2))
    (exp,) = {p.name.strip(".").removesuffix(".old").removesuffix(".tmp") for p in (cwd / "runs").iterdir()}
    run, old, tmp = (cwd / "runs" / name for name in (exp, f".{exp}.old", f".{exp}.tmp"))
    projector = (run / "align" / "projector.safetensors").read_bytes()
    resume = ("--resume_from", str(Path("runs") / exp))

    def step(directory: Path) -> int:
        return json.loads((directory / "checkpoint.json").read_text())["step"]

    for point in ("sidecar-write", "between-renames"):  # killed inside step 4's save again, at the next point
        assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL: no exception handler, no cleanup ran
        assert step(run) == 2 and not (tmp / "checkpoint.json").exists()  # the half-written save never counts
        proc, _ = finetune(world, cwd, "--max_steps", "4", *args, *resume, check=False, kill_at=(point, 1))
        assert "after gradient step 2" in proc.stdout and "interrupted" not in proc.stdout
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not run.exists() and step(old) == 2 and step(tmp) == 4  # both complete: nothing was lost
    assert (tmp / "align" / "projector.safetensors").read_bytes() == projector

    proc, _ = finetune(world, cwd, "--max_steps", "6", *args, *resume, check=False, kill_at=("after-renames", 1))
    lines = [line for line in proc.stdout.splitlines() if "interrupted" in line]
    moved = f"A save was interrupted: `runs/.{exp}.tmp` (step 4) is the newest complete checkpoint, now `runs/{exp}`"
    assert lines == [moved], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "after gradient step 4" in proc.stdout and proc.returncode == -9
    assert step(run) == 6 and step(old) == 4  # renamed into place, the previous one not yet deleted

    proc, _ = finetune(world, cwd, "--max_steps", "8", *args, *resume)
    assert "after gradient step 6" in proc.stdout and "interrupted" not in proc.stdout
    assert step(run) == 8 and (run / "align" / "projector.safetensors").read_bytes() == projector
    assert [p.name for p in (cwd / "runs").iterdir()] == [exp]  # the last save cleaned up after itself


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
