"""Pinned CPU code paths, so that a CPU run prints the same figures on any x86-64 machine with AVX2.

PyTorch's CPU kernels pick their code path by the CPU they find, and so do the libraries under them; each path sums
in its own order, and a hundred training steps carry the last bit into the figures. Measured on the demo's quick
setting (issue 40): the ATen kernels (softmax, norms, reductions: AVX2 vs AVX-512) and oneDNN (the convolutions)
change its figures on an AVX-512 machine, and so does MKL's GEMM where it picks another path (``MKL_CBWR=COMPATIBLE``
changed them here; on this AMD machine MKL's own choice is already its AVX2 path; on Intel AVX-512 machines it is
not). Each library has a switch that fixes its path, read once, when the library first runs:

==================== ========= ===================================================================
variable             value     fixes
==================== ========= ===================================================================
ATEN_CPU_CAPABILITY  avx2      PyTorch's own vectorised kernels (``torch.backends.cpu``)
ONEDNN_MAX_CPU_ISA   AVX2      oneDNN's JIT kernels (convolutions): no AVX-512, no AMX
MKL_CBWR             AVX2      MKL's GEMM: its conditional-numerical-reproducibility AVX2 branch
==================== ========= ===================================================================

:func:`pin` sets them for this process and must run before torch does anything (the CLI calls it before it imports
the command); :func:`world` records what decides float results, for a run's JSON. With
``OPENVLA_ALIGN_NATIVE_CPU=1`` nothing is pinned (the CPU's fastest paths; figures may then differ by machine).
Thread counts matter as well: callers fix them (the demo runs every stage on a fixed number of torch threads).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Dict, MutableMapping, Optional

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
NATIVE_ENV = "OPENVLA_ALIGN_NATIVE_CPU"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")

_state: Dict[str, Optional[bool]] = {"pinned": None}


def native_requested(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(NATIVE_ENV, "") not in ("", "0")


def pin(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Set :data:`PINS` in ``environ`` (this process's by default) unless :data:`NATIVE_ENV` asks for the CPU's own
    paths. Returns whether the pins are in force: set before torch was imported here, or already set by whoever
    started this process (a pin set after torch ran may be too late, and is then not claimed)."""
    environ = os.environ if environ is None else environ
    if native_requested(environ) or platform.machine().lower() not in ("x86_64", "amd64"):
        _state["pinned"] = False
        return False
    already = all(environ.get(k) == v for k, v in PINS.items())
    environ.update(PINS)
    _state["pinned"] = already or "torch" not in sys.modules
    return bool(_state["pinned"])


def _cpu_model_and_flags() -> Dict[str, object]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags]}


def world() -> Dict[str, object]:
    """What decides this process's float results on the CPU: the machine, the code paths in force, the threads."""
    import torch

    cfg = torch.__config__.show()
    libs = [line.strip(" -") for line in cfg.splitlines() if "Math Kernel Library" in line or "MKL-DNN" in line]
    pinned = bool(_state["pinned"]) and torch.backends.cpu.get_cpu_capability() == PINS["ATEN_CPU_CAPABILITY"].upper()
    return {
        "machine": platform.machine(),
        "cpu": _cpu_model_and_flags(),
        "cpu_count": os.cpu_count(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "libraries": libs,
        "env": {k: os.environ.get(k) for k in (*PINS, *THREAD_VARS, NATIVE_ENV)},
        "pinned": pinned,
    }


def describe(w: Dict[str, object]) -> str:
    """One line: the CPU and the code paths a run used."""
    paths = (
        "pinned AVX2 paths (" + ", ".join(f"{k}={v}" for k, v in PINS.items()) + ")"
        if w["pinned"]
        else f"this CPU's own paths (ATen {w['aten_capability']}; not pinned)"
    )
    return f"{w['cpu']['model']} ({w['machine']}), {paths}"
