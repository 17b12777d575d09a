"""Crash safety of the patched OpenVLA-OFT script (issue 32): SIGKILL at each point of a save (through the test shim's
``kill_at``), a full disk, then OFT's own resume (``--resume true``; without ``--resume_step`` the run's newest
complete checkpoint). Its own file so that pytest-xdist runs it beside ``tests/test_oft_finetune.py``, whose world
and helpers it shares. Discrete-token runs with one image and a trainable projector: the cheapest OFT mode that
saves a merged model and the projector's AdamW state, whose step count tells whether it was restored."""

import json
from pathlib import Path

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


def test_a_kill_inside_each_write_of_a_save_resumes_from_the_runs_newest_complete_checkpoint(world):
    """One run killed (SIGKILL) inside step 2's save at each write in turn, each resume the next kill's run: in the
    LoRA adapter's write, in the sidecar's (OFT's own files written, the projector half-written), in the merged
    model's. Each time step 1's checkpoint is untouched and complete and step 2's a hidden staging directory without
    `checkpoint.json`; `--resume true` without `--resume_step` says it takes step 1, and the last resume saves step
    2 with step 1's projector AdamW state carried on; nothing staged is left."""
    name, args = "killed-writes", [*TRAIN, "--max_steps", "2"]
    proc, _, runs = run(world, name, *args, check=False, kill_at=("adapter-write", 2))
    exp = run_name(runs)
    first, staged = runs / f"{exp}--1_chkpt", runs / f".{exp}--2_chkpt.tmp"
    for point in ("sidecar-write", "merged-write", None):
        assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL: no exception handler, no cleanup ran
        assert marker(first)["step"] == 1 and marker(first)["merged"] and optimizer_steps(first) == {2.0}
        assert staged.is_dir() and not (staged / "checkpoint.json").exists()
        assert not (runs / f"{exp}--2_chkpt").exists()
        kill = {"kill_at": (point, 1), "check": False} if point else {}
        proc, _, _ = run(world, name, *args, "--resume", "true", vla_path=runs / exp, **kill)
        assert f"Resuming from `{first}`, step 1, the newest complete checkpoint of the run" in proc.stdout
    second = runs / f"{exp}--2_chkpt"
    assert marker(second)["step"] == 2
    assert optimizer_steps(second) == {4.0}  # step 1's 2 AdamW steps restored + 2 more (a fresh state would give 2)
    assert sorted(p.name for p in runs.iterdir()) == sorted([exp, first.name, second.name])  # nothing staged left


def test_kills_between_and_after_the_renames_under_torchrun_lose_nothing(world):
    """Two ranks (torchrun, gloo), one checkpoint kept (`--save_latest_checkpoint_only`). Rank 0 killed while step
    2's save is between its renames (step 1 moved to `.<run>.old`, step 2's complete one still `.<run>.tmp`, nothing
    at `<run>`): `--resume true --vla_path runs/<run>` moves step 2 into place in one line and both ranks continue;
    killed again right after step 3's renames (`<run>` = step 3, `.old` = step 2 not yet deleted): `--resume_step 3`
    on one process continues from step 3 without a word, and its save removes the leftover. The projector's AdamW
    step count shows each restore (3 at step 2, + 2 a resumed run)."""
    args = [*TRAIN, *LATEST_ONLY]
    proc, _, runs = run(world, "renames", *args, "--max_steps", "2", nproc=2, check=False,
                        kill_at=("between-renames", 2))  # fmt: skip
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    exp = run_name(runs)
    old, tmp = runs / f".{exp}.old", runs / f".{exp}.tmp"
    assert not (runs / exp).exists() and marker(old)["step"] == 1 and marker(tmp)["step"] == 2
    proc, _, _ = run(world, "renames", *args, "--max_steps", "3", "--resume", "true", vla_path=runs / exp, nproc=2,
                     check=False, kill_at=("after-renames", 1))  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if "interrupted" in line]
    assert lines == [f"A save was interrupted: `{tmp}` (step 2) is the newest complete checkpoint, now `{runs / exp}`"]
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    assert marker(runs / exp)["step"] == 3 and optimizer_steps(runs / exp) == {5.0}  # 3 restored + 2
    assert marker(old)["step"] == 2  # renamed into place, the previous one not yet deleted
    proc, _, _ = run(world, "renames", *args, "--max_steps", "4", "--resume", "true", "--resume_step", "3",
                     vla_path=runs / exp)  # fmt: skip
    assert "Resuming from" not in proc.stdout and "interrupted" not in proc.stdout
    assert marker(runs / exp)["step"] == 4 and optimizer_steps(runs / exp) == {7.0}
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


def test_a_checkpoint_with_a_file_cut_short_is_refused_in_one_line(world):
    """A half-written file is never loaded: `--resume true --resume_step 1` on a checkpoint whose adapter was cut
    short stops before anything is written, naming the file and its sizes (the other refusals, such as a
    `--resume_step` that is not the checkpoint's, are the helper's unit tests in test_patch.py)."""
    runs = world.root / "disk-full" / "runs"
    if not runs.exists():
        run(world, "disk-full", *TRAIN, "--max_steps", "2", check=False, kill_at=("disk-full", 2))
    first = runs / f"{run_name(runs)}--1_chkpt"
    (first / "lora_adapter" / "adapter_model.safetensors").write_bytes(b"cut short")
    proc, _, new_runs = run(world, "refused-cut", *TRAIN, "--max_steps", "4", "--resume", "true", "--resume_step",
                            "1", vla_path=first, check=False)  # fmt: skip
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith(f"No complete checkpoint `{first}` at step 1"), last
    assert "(`lora_adapter/adapter_model.safetensors` has 9 bytes" in last and "the newest complete one is" not in last
    assert not new_runs.exists()
