"""Run a script the way the crash tests need: it cannot hang the test, and nothing it started outlives it.

``subprocess.run(..., capture_output=True)`` waits for EOF on the child's pipes, so a grandchild that keeps them open
(wandb 0.16's ``wandb-service``, a data-loader worker, torchrun's agent) hangs the test forever once the script was
SIGKILLed and could not stop it. :func:`run` gives the child files instead of pipes (its exit is all we wait for),
starts it in its own session and process group, and kills that whole group when the child has exited or timed out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from typing import Mapping, Optional, Sequence


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in group ``pgid`` (a no-op when none is)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run(
    cmd: Sequence[str],
    *,
    cwd: Optional[os.PathLike] = None,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` that returns when ``cmd`` itself has
    exited, whatever its children do, and leaves none of them running. On timeout the group is killed and
    :class:`subprocess.TimeoutExpired` carries what was printed."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            list(map(str, cmd)),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_group(proc.pid)  # the session leader's pid is the group id
            proc.wait()
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", errors="replace"))
    if timed_out:
        raise subprocess.TimeoutExpired(list(cmd), timeout, output=texts[0], stderr=texts[1])
    return subprocess.CompletedProcess(list(cmd), returncode, texts[0], texts[1])
