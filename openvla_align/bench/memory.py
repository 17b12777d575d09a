"""Peak memory of a training step per mode, measured in a fresh subprocess each (CPU: the C heap; CUDA: the
allocator's peak)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from .model import MODES, SCALES, Runner, batches, bench_sources, build, build_heads, mode_scale


def _heap_reader():
    """Bytes the process's C heap has handed out and not freed (glibc ``mallinfo2``: in-use chunks + mmapped
    blocks), which is where torch's CPU allocator gets its memory. Unlike RSS it drops when tensors are freed, so its
    peak is the CPU analogue of ``torch.cuda.max_memory_allocated``. Falls back to RSS without glibc >= 2.33."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
        fn.restype = MallInfo2

        def heap() -> int:
            info = fn()
            return int(info.uordblks + info.hblkhd)

        heap()
        return heap, "heap in use (mallinfo2)"
    except (OSError, AttributeError):

        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        return rss, "resident set size"


def peak_memory(
    mode: str,
    cache_dir: Optional[str] = None,
    steps: int = 3,
    batch_size: int = 2,
    device: str = "cpu",
    scale: str = "cpu",
) -> int:
    """Peak bytes for ``mode`` in this process: CUDA allocator peak, or peak RSS above the pre-model baseline.
    Only the live and reference modes build a teacher; the cache modes read ``cache_dir`` (built elsewhere)."""
    from ..targets.cache import TeacherCache

    measure, _ = _heap_reader()
    baseline = measure()
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], measure())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    if not device.startswith("cuda"):
        sampler.start()
    base = SCALES[scale]
    scale = mode_scale(base, mode)
    kind = mode.split("-")[0]
    torch.manual_seed(0)
    vla, teacher = build(scale, device=device, with_teacher=kind in ("live", "reference"))
    vla.train()
    cache = TeacherCache(cache_dir) if kind == "cache" else None
    runner = Runner(mode, vla, teacher, cache, scale, device, heads=build_heads(scale, device=device))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    data = batches(base, batch_size)
    with runner:
        for _ in range(steps):
            runner.step(next(data))
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    stop.set()
    sampler.join()
    return peak[0] - baseline


def memory_modes(modes=MODES, device: str = "cpu", batch_size: int = 2, scale: str = "cpu") -> Dict[str, object]:
    """Each mode in a fresh interpreter (a process's peak cannot be reset); the caches are built here first."""
    peaks = {}
    base = SCALES[scale]
    with tempfile.TemporaryDirectory() as tmp:
        _, teacher = build(base, device=device)
        bench_sources(modes, base, teacher, Path(tmp), batch_size, device)  # one cache per teacher, then dropped
        del teacher
        for mode in modes:
            cache_dir = str(Path(tmp) / mode_scale(base, mode).teacher_name)
            code = (
                "import json, sys; from openvla_align.bench import peak_memory; "
                f"print(json.dumps(peak_memory({mode!r}, {cache_dir!r}, device={device!r}, "
                f"batch_size={batch_size}, scale={scale!r})))"
            )
            proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"memory run for {mode} failed:\n{proc.stderr[-3000:]}")
            peaks[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    what = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else _heap_reader()[1] + ", sampled"
    return {"peak_bytes": peaks, "ratio": {m: peaks[m] / peaks["sft"] for m in modes}, "measure": what}
