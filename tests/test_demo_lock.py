"""The README's first command is locked and its figures do not depend on the CPU (issue 40).

- The recorded runs (docs/demo/) were made with the lock's packages (constraints/demo.txt) and on pinned code paths.
- `openvla-align demo --quick` prints exactly the committed figures (tests/data/demo_quick.json), also when the CPU
  is made to look like another one: a one-core AVX2-only machine, stood in for by capping ATen, oneDNN and MKL at
  AVX2, running the demo on that "machine's" native paths and the robot runs one at a time. On an AVX-512 machine
  the native paths must give other figures (the check can tell a difference).

The quick runs need the lock's packages: scripts/test.sh installs the lock into its `current` venv after that
phase's tests and runs this file again with DEMO_LOCK=1; elsewhere those tests skip and say so.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from pathlib import Path

import _proc
import pytest

from openvla_align import numerics
from openvla_align.demo import QUICK, report

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints" / "demo.txt"
QUICK_FIGURES = ROOT / "tests" / "data" / "demo_quick.json"
RUNS = [ROOT / "docs" / "demo" / "run.json", ROOT / "docs" / "demo" / "other.json"]


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def lock() -> dict:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_norm(name)] = version
    return pins


def test_the_lock_pins_every_package_exactly():
    text = [line for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert text and all("==" in line and not any(c in line for c in "<>~!;") for line in text)
    assert {"torch", "torchvision", "transformers", "timm", "peft", "numpy", "matplotlib"} <= set(lock())
    assert "openvla-align" not in lock()


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.name)
def test_recorded_runs_used_the_lock_and_pinned_paths(path):
    run = json.loads(path.read_text())
    versions = {_norm(k): v for k, v in run["code"]["versions"].items() if k != "python"}
    pins = lock()
    assert versions and {k: pins.get(k) for k in versions} == versions, "re-run the demo with the lock installed"
    assert run["code"]["versions"]["python"].startswith("3.11.")
    world = run["world"]
    assert world["pinned"] and world["aten_capability"] == "AVX2" and world["machine"] == "x86_64"
    assert {k: world["env"][k] for k in numerics.PINS} == numerics.PINS
    assert run["fingerprint"] == report.figures_fingerprint(run["teacher_probe"], run["base"], run["per_seed"])


def test_pin_sets_the_paths_before_torch_and_says_when_it_is_too_late():
    env = {"ATEN_CPU_CAPABILITY": "avx512"}
    assert numerics.pin(env) is False  # torch is imported in this process: not claimed
    assert {k: env[k] for k in numerics.PINS} == numerics.PINS
    assert numerics.pin(dict(numerics.PINS)) is True  # set by whoever started the process: in force
    assert numerics.pin({numerics.NATIVE_ENV: "1"}) is False
    code = "from openvla_align import numerics; print(numerics.pin())"
    out = _proc.run([sys.executable, "-c", code], env=_clean_env(), timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*numerics.PINS, numerics.NATIVE_ENV)}
    env.update(extra)
    return env


def _installed_equals_lock() -> list:
    pins = lock()
    wrong = []
    for dist in importlib.metadata.distributions():
        name = _norm(dist.metadata["Name"])
        if name in pins and dist.version != pins[name]:
            wrong.append(f"{name} {dist.version} (lock {pins[name]})")
    return wrong


lock_only = pytest.mark.skipif(
    os.environ.get("DEMO_LOCK") != "1",
    reason="runs in scripts/test.sh's demo-lock step (the lock installed, DEMO_LOCK=1)",
)


def _quick(tmp_path, name, *args, **env) -> dict:
    out = tmp_path / name
    exe = Path(sys.executable).parent / "openvla-align"
    proc = _proc.run([exe, "demo", "--quick", "--out", out, *args], env=_clean_env(**env), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"figures fingerprint {metrics['fingerprint']}" in proc.stdout
    return metrics


def _figures(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("fingerprint", "teacher_probe", "base", "per_seed")}


@lock_only
def test_quick_demo_prints_the_committed_figures_on_pinned_paths(tmp_path):
    wrong = _installed_equals_lock()
    assert not wrong, f"not the lock's packages: {wrong}"
    metrics = _quick(tmp_path, "pinned")
    assert metrics["world"]["pinned"] and metrics["world"]["aten_capability"] == "AVX2"
    assert {k: v for k, v in metrics["config"].items() if k in QUICK} == json.loads(json.dumps(QUICK))
    committed = json.loads(QUICK_FIGURES.read_text())
    assert _figures(metrics) == committed["figures"], (
        "The quick demo's figures are not the committed ones: if the code or the lock changed on purpose, write "
        f"tests/data/demo_quick.json anew (see its note). Now: {json.dumps(_figures(metrics))}"
    )


@lock_only
def test_an_avx2_only_machine_running_its_own_paths_prints_the_same_figures(tmp_path):
    """The stand-in for another CPU: its native paths are capped at AVX2 (no pins by the demo), and it has one core
    (the robot runs one at a time)."""
    avx2_machine = dict(
        ATEN_CPU_CAPABILITY="avx2",
        ONEDNN_MAX_CPU_ISA="AVX2",
        MKL_ENABLE_INSTRUCTIONS="AVX2",
        **{numerics.NATIVE_ENV: "1"},
    )
    metrics = _quick(tmp_path, "avx2", "--workers", "1", **avx2_machine)
    assert not metrics["world"]["pinned"] and metrics["world"]["aten_capability"] == "AVX2"
    assert _figures(metrics) == json.loads(QUICK_FIGURES.read_text())["figures"]


@lock_only
@pytest.mark.skipif(
    "avx512f" not in numerics.world()["cpu"]["flags"], reason="needs an AVX-512 CPU, whose native paths differ"
)
def test_this_cpus_native_paths_give_other_figures(tmp_path):
    """Without the pins an AVX-512 machine prints other figures: the check above can fail."""
    metrics = _quick(tmp_path, "native", **{numerics.NATIVE_ENV: "1"})
    assert metrics["world"]["aten_capability"] != "AVX2"
    assert metrics["fingerprint"] != json.loads(QUICK_FIGURES.read_text())["figures"]["fingerprint"]
