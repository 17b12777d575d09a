"""What produced an evaluation result: the model's weights, the action statistics and the settings that change
the numbers. Every ``result.json`` records it; a re-run skips a pair only when the identity it would write matches.

The model is identified by a fingerprint of its weight files' contents (and the adapter's), not by its path: a
copied or renamed checkpoint keeps its fingerprint, a retrained one does not. Hashing 15 GB of OpenVLA-7B on every
``eval run`` would cost a minute, so each weight file contributes its name, its size and a BLAKE2 hash of sampled
blocks (the first and last MiB and 32 evenly spaced 64 KiB blocks between): any retraining rewrites essentially
every byte of a file, so two different trainings share a fingerprint only if they agree on every sampled block.

Compared when deciding whether an existing result may stand: :data:`COMPARED` (the fingerprint, the unnorm key
and its action statistics, the recipe settings that change success rates, the simulator and its backends, the
dtype). Recorded but not compared: the paths (a copy is the same model) and the openvla-align version (an upgrade
should not discard hours of evaluation; pass ``--overwrite`` to re-run after one that changes decoding).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HEAD_TAIL, BLOCK, BLOCKS = 1 << 20, 1 << 16, 32
COMPARED = (
    "fingerprint",
    "unnorm_key",
    "action_stats",
    "num_envs",
    "episode_len",
    "episodes",
    "obj_set",
    "policy",
    "simulator",
    "sim_backend",
    "render_backend",
    "dtype",
)
UNKNOWN = "not recorded (written before openvla-align recorded what produced a result)"


def _file_digest(path: Path, hasher) -> None:
    size = path.stat().st_size
    hasher.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= 2 * HEAD_TAIL + BLOCKS * BLOCK:
            hasher.update(f.read())
            return
        offsets = [0] + [HEAD_TAIL + i * (size - 2 * HEAD_TAIL - BLOCK) // (BLOCKS - 1) for i in range(BLOCKS)]
        for offset in offsets:
            f.seek(offset)
            hasher.update(f.read(HEAD_TAIL if offset == 0 else BLOCK))
        f.seek(size - HEAD_TAIL)
        hasher.update(f.read(HEAD_TAIL))


def weight_files(directory: Path) -> List[Path]:
    """The weight files of a checkpoint or adapter directory (top level, sorted by name)."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def fingerprint(vla_path, adapter=None) -> str:
    """``blake2b:<32 hex>`` over the sampled contents of the model's weight files (and the adapter's)."""
    hasher = hashlib.blake2b(digest_size=16)
    for role, directory in (("model", vla_path), ("adapter", adapter)):
        if directory is None:
            continue
        files = weight_files(Path(directory))
        if not files:
            raise FileNotFoundError(
                f"{directory} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}): not a {role} checkpoint"
            )
        hasher.update(f"{role}\0".encode())
        for path in files:
            _file_digest(path, hasher)
    return f"blake2b:{hasher.hexdigest()}"


def stats_digest(action_stats: Mapping) -> str:
    """A short hash of the action statistics used to un-normalise (a re-computed ``dataset_statistics`` changes it)."""
    text = json.dumps(action_stats, sort_keys=True, default=float)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def action_stats_from_config(vla_path, unnorm_key: str) -> Optional[Mapping]:
    """The ``norm_stats[unnorm_key]["action"]`` of a checkpoint's config.json (None when absent), read without
    loading the model: the model's own check names a missing key once it is loaded."""
    try:
        config = json.loads((Path(vla_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    stats = config.get("norm_stats") or {}
    entry = stats.get(unnorm_key)
    return entry.get("action") if isinstance(entry, dict) else None


def build(
    vla_path,
    adapter,
    *,
    unnorm_key: str,
    recipe,
    simulator: str,
    sim_backend: str,
    render_backend: str,
    dtype: str,
    unnorm_keys: Optional[Mapping[str, str]] = None,
) -> Dict:
    """The identity ``eval run`` writes into each ``result.json`` (under ``"identity"``). ``unnorm_keys`` (each
    environment's key, when ``unnorm_key`` is ``auto``) digests the statistics of every key it names, read as
    :func:`~openvla_align.eval.simulators.checkpoint_norm_stats` reads them."""
    from .._plugins import installed_version

    ours = installed_version("openvla-align") or "unknown"  # "unknown": run from a source tree never installed
    if unnorm_key == "auto" and unnorm_keys:
        from .simulators import checkpoint_norm_stats

        norm = checkpoint_norm_stats(vla_path, adapter) or {}
        stats = {k: (norm.get(k) or {}).get("action") for k in sorted(set(unnorm_keys.values()))}
    else:
        stats = action_stats_from_config(adapter or vla_path, unnorm_key) or action_stats_from_config(
            vla_path, unnorm_key
        )
    return {
        "vla_path": str(Path(vla_path).resolve()),
        "adapter": str(Path(adapter).resolve()) if adapter else None,
        "fingerprint": fingerprint(vla_path, adapter),
        "unnorm_key": unnorm_key,
        "action_stats": stats_digest(stats) if stats is not None else None,
        "num_envs": recipe.num_envs,
        "episode_len": recipe.episode_len,
        "episodes": getattr(recipe, "episodes", None),
        "obj_set": recipe.obj_set,
        "policy": dict(recipe.policy) if getattr(recipe, "policy", None) else None,
        "simulator": simulator,
        "sim_backend": sim_backend,
        "render_backend": render_backend,
        "dtype": dtype,
        "openvla_align": ours,
    }


def differences(have: Optional[Mapping], want: Mapping) -> List[Tuple[str, object, object]]:
    """``(field, recorded, now)`` for each compared field that differs; a missing identity differs in all."""
    if not isinstance(have, Mapping):
        return [("identity", UNKNOWN, "this run's")]
    return [(k, have.get(k), want.get(k)) for k in COMPARED if have.get(k) != want.get(k)]


def describe(diffs: Sequence[Tuple[str, object, object]], have: Optional[Mapping] = None) -> str:
    """One clause naming what differs, e.g. ``fingerprint blake2b:1a2b… (runs/a/merged) here, blake2b:9f8e… now``."""
    parts = []
    for key, old, new in diffs:
        if key == "identity":
            parts.append(f"what produced it is {old}")
            continue
        if key == "fingerprint":
            where = f" ({(have or {}).get('adapter') or (have or {}).get('vla_path')})" if have else ""
            parts.append(f"model weights {_short(old)}{where} there, {_short(new)} now")
        else:
            parts.append(f"{key} {old!r} there, {new!r} now")
    return "; ".join(parts)


def _short(value) -> str:
    return f"{str(value)[:16]}…" if isinstance(value, str) and len(value) > 16 else str(value)


def signature(identity: Optional[Mapping]) -> Tuple:
    """The compared fields as a hashable key (None for a result without an identity)."""
    if not isinstance(identity, Mapping):
        return (None,)
    return tuple(json.dumps(identity.get(k), sort_keys=True) for k in COMPARED)
