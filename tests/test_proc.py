"""tests/_proc.py: a script killed while a child of its own holds its output returns at once, and the child goes too
(the hang of issue 40: wandb-service kept a SIGKILLed finetune.py's pipes open)."""

import os
import subprocess
import sys
import time

import _proc
import pytest

# The parent starts a child that inherits stdout/stderr and sleeps, writes the child's pid, then SIGKILLs itself.
SCRIPT = """
import os, signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
print("to stderr", file=sys.stderr, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) counts as gone
        return f.read().split(") ")[1][0] != "Z"


def test_a_killed_script_returns_at_once_and_its_children_are_gone():
    start = time.monotonic()
    proc = _proc.run([sys.executable, "-c", SCRIPT], timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == -9 and proc.stderr == "to stderr\n"
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_capture_output_would_have_waited_for_the_child():
    """The test of the test: the same script under subprocess.run(capture_output=True) is still waited for after
    20 s (its parent is dead within about a second; the sleeping child holds the pipes)."""
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, timeout=20)
    pid = int(caught.value.output.split()[0])
    os.kill(pid, 9)


def test_a_timeout_kills_the_group_and_keeps_the_output():
    code = "import time; print('started', flush=True); time.sleep(600)"
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        _proc.run([sys.executable, "-c", code], timeout=10)
    assert caught.value.output == "started\n"
