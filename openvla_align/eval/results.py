"""Evaluation results on disk: ours and the reference implementation's, one layout.

Both write ``RUN/<env_id>/<obj_set>/<seed>/`` per evaluation: the reference a ``stats.yaml`` with the success rate
over its parallel environments under ``succes_once`` (sic, a string), openvla-align a ``result.json`` with the
per-episode successes. A run is the directory above the env ids; its label is the directory name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .identity import signature

RESULT_FILE = "result.json"
REFERENCE_FILE = "stats.yaml"
# Simpler/ManiSkill ids (PutOnPlateInScene25Carrot-v1) and LIBERO tasks (libero_spatial-3: suite, task number)
ENV_PATTERN = re.compile(r"^([A-Za-z0-9]+-v\d+|libero_[a-z0-9]+-\d+)$")


@dataclass
class Run:
    label: str
    root: Path
    # (env_id, obj_set, seed) -> success rate in [0, 1]
    cells: Dict[Tuple[str, str, str], float] = field(default_factory=dict)
    episodes: Dict[Tuple[str, str, str], int] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    # identity signature (see ``identity.signature``) -> the (env_id, obj_set, seed) cells it produced
    identities: Dict[Tuple, List[Tuple[str, str, str]]] = field(default_factory=dict)
    # env_id -> the instruction of its first episode (LIBERO's tables name each task by it)
    instructions: Dict[str, str] = field(default_factory=dict)

    def envs(self) -> List[str]:
        return sorted({env for env, _, _ in self.cells})

    def seeds(self, env: str, obj_set: Optional[str] = None) -> Dict[str, float]:
        return {s: v for (e, o, s), v in self.cells.items() if e == env and (obj_set is None or o == obj_set)}


def _read_reference(path: Path) -> Tuple[float, Optional[int]]:
    import yaml

    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "succes_once" not in data:
        raise ValueError(f"{path} has no `succes_once` entry (not a reference stats.yaml)")
    rate = float(data["succes_once"])
    instructions = data.get("instruction")
    return rate, len(instructions) if isinstance(instructions, dict) else None


def read_result(path: Path) -> dict:
    """A ``result.json``; ``ValueError`` when it is not one (e.g. cut short by a crash: never a success rate)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): cut short by a crash?") from exc
    episodes = data.get("episodes") if isinstance(data, dict) else None
    if not isinstance(episodes, list) or not episodes:
        raise ValueError(f"{path} has no per-episode successes (`episodes`)")
    return data


def _read_ours(path: Path) -> Tuple[float, int, Optional[dict], Optional[str]]:
    data = read_result(path)
    successes = [bool(e["success"] if isinstance(e, dict) else e) for e in data["episodes"]]
    first = data["episodes"][0]
    instruction = first.get("instruction") if isinstance(first, dict) else None
    return sum(successes) / len(successes), len(successes), data.get("identity"), instruction


def evaluation_set(env_id: str) -> str:
    """The object set an environment is evaluated on: the paper's held-out ``test`` objects in Simpler, the
    benchmark's fixed initial states (``default``) in LIBERO."""
    return "default" if env_id.startswith("libero_") else "test"


def load_run(root, label: Optional[str] = None, obj_set: Optional[str] = "") -> Run:
    """Read every ``<env_id>/<obj_set>/<seed>/{result.json,stats.yaml}`` under ``root``: of the given object set,
    of every one (None), or of each environment's evaluation set (``""``, the default: :func:`evaluation_set`)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory of evaluation results")
    run = Run(label or root.name, root)
    for env_dir in sorted(p for p in root.iterdir() if p.is_dir() and ENV_PATTERN.match(p.name)):
        for set_dir in sorted(p for p in env_dir.iterdir() if p.is_dir()):
            wanted = evaluation_set(env_dir.name) if obj_set == "" else obj_set
            if wanted is not None and set_dir.name != wanted:
                continue
            for seed_dir in sorted(p for p in set_dir.iterdir() if p.is_dir()):
                key = (env_dir.name, set_dir.name, seed_dir.name)
                found = [f for f in (RESULT_FILE, REFERENCE_FILE) if (seed_dir / f).is_file()]
                if len(found) > 1:
                    run.problems.append(f"{run.label}: {seed_dir} holds both {' and '.join(found)}; used {found[0]}")
                if not found:
                    run.problems.append(f"{run.label}: {seed_dir} has no {RESULT_FILE} or {REFERENCE_FILE}")
                    continue
                try:
                    if found[0] == RESULT_FILE:
                        rate, n, ident, instruction = _read_ours(seed_dir / RESULT_FILE)
                        run.identities.setdefault(signature(ident), []).append(key)
                        if instruction:
                            run.instructions.setdefault(env_dir.name, instruction)
                    else:
                        rate, n = _read_reference(seed_dir / REFERENCE_FILE)
                except (ValueError, KeyError, TypeError, OSError) as exc:
                    run.problems.append(f"{run.label}: unreadable {seed_dir / found[0]} ({exc}); skipped")
                    continue
                run.cells[key] = rate
                if n is not None:
                    run.episodes[key] = n
    if len(run.identities) > 1:
        groups = sorted(run.identities.values(), key=len, reverse=True)
        counts = ", ".join(f"{len(g)} like {'/'.join(g[0])}" for g in groups)
        raise ValueError(
            f"{root} holds results of {len(groups)} different models or settings ({counts}), which must not be "
            "averaged: evaluate each model into its own directory (`eval run --out`), or re-run the odd ones with "
            "`eval run --overwrite`."
        )
    if not run.cells:
        raise FileNotFoundError(
            f"No results under {root}: expected {root}/<env_id>/<obj_set>/<seed>/{RESULT_FILE} (openvla-align) "
            f"or .../{REFERENCE_FILE} (reference implementation)."
        )
    return run


def write_result(
    directory, env_id: str, obj_set: str, seed, successes: List[bool], records: Optional[List[dict]] = None, **extra
) -> Path:
    """Write one (env, seed) result as ``directory/<env_id>/<obj_set>/<seed>/result.json`` (atomically);
    ``records`` adds per-episode fields (instruction, first success step, episode seed) to each episode's entry."""
    from .._io import atomic_write_bytes

    path = Path(directory) / env_id / obj_set / str(seed) / RESULT_FILE
    records = records or [{} for _ in successes]
    if len(records) != len(successes):
        raise ValueError(f"{len(records)} episode records for {len(successes)} episodes")
    data = {
        "env_id": env_id,
        "obj_set": obj_set,
        "seed": seed,
        "success_rate": sum(map(bool, successes)) / max(1, len(successes)),
        "episodes": [{"success": bool(s), **r} for s, r in zip(successes, records)],
        **extra,
    }
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
    return path
