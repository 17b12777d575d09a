"""`openvla-align merge RUN/STEP`: merge a LoRA adapter into its base once, on one process, offline.

Upstream merges on every save on every rank (and runs out of memory on multi-GPU nodes); with the patched script's
``--merge_on_save false`` only adapters are written and this command merges the one you want. The merged model has
exactly the base model's state-dict keys (the alignment sidecar stays beside the adapter), its processor files,
and the run's ``dataset_statistics.json`` folded into ``config.json`` as ``norm_stats``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from .. import dtypes
from .._io import atomic_write_bytes
from ..argtypes import existing_dir, need_dir, output_dir

logger = logging.getLogger(__name__)

STATS_NAME = "dataset_statistics.json"
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _find_stats(adapter: Path) -> Optional[Path]:
    for d in (adapter, adapter.parent, adapter.parent.parent):
        if (d / STATS_NAME).is_file():
            return d / STATS_NAME
    return None


def fold_norm_stats(model_dir, stats: Optional[Path] = None) -> List[str]:
    """Fold ``dataset_statistics.json`` (default: the one in ``model_dir``) into ``model_dir/config.json`` as
    ``norm_stats`` (existing keys kept, same names replaced); returns the unnorm keys it added. ``config.json`` is
    rewritten atomically; a missing or unreadable statistics file raises and changes nothing."""
    model_dir = Path(model_dir)
    stats = Path(stats) if stats is not None else model_dir / STATS_NAME
    try:
        norm_stats = json.loads(stats.read_text())
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"Cannot fold {stats} into {model_dir / 'config.json'}: {exc}") from exc
    if not isinstance(norm_stats, dict) or not all(isinstance(v, dict) and "action" in v for v in norm_stats.values()):
        raise ValueError(f"{stats} is not OpenVLA dataset statistics ({{dataset: {{'action': ...}}}}).")
    config["norm_stats"] = {**config.get("norm_stats", {}), **norm_stats}
    atomic_write_bytes(model_dir / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return sorted(norm_stats)


def _checkpoint_keys(model_dir: Path) -> set:
    """Tensor names of a saved model, read from its safetensors index or headers (no weights loaded)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    keys = set()
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            keys.update(f.keys())
    if not keys:
        raise FileNotFoundError(f"{model_dir} holds no safetensors weights to compare the merged model against.")
    return keys


def merge_adapter(adapter, out, base=None, *, dtype: str = "bfloat16") -> Dict[str, object]:
    """Merge ``adapter`` into ``base`` (default: the adapter's ``base_model_name_or_path``) and write ``out``.

    Written into a temporary sibling directory and renamed into place, so an interrupted merge leaves no
    half-written model. Returns a summary (paths, unnorm keys).
    """
    from ..vla.checkpoint import load_vla

    adapter, out = need_dir(adapter, "adapter"), Path(out)
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json).")
    recorded = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base and not recorded:
        raise ValueError(
            f"{cfg_path} records no base model (base_model_name_or_path is empty); pass --base /path/to/openvla-7b."
        )
    base = Path(base or recorded)
    if not base.is_dir():
        raise FileNotFoundError(
            f"Base model {str(base)!r} is not a local directory; pass --base /path/to/openvla-7b (merging is offline)."
        )
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"Base model {str(base)!r} has no config.json: not a checkpoint directory; pass --base "
            "/path/to/openvla-7b (the directory holding config.json and the weights)."
        )
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out or remove it first (nothing was written).")
    loaded = load_vla(base, adapter, dtype=dtype, attn_implementation=None)
    base_keys = _checkpoint_keys(base)
    merged = loaded.model.merge_and_unload()
    keys = set(merged.state_dict())
    if keys != base_keys:
        extra, missing = sorted(keys - base_keys)[:5], sorted(base_keys - keys)[:5]
        raise RuntimeError(f"Merged model keys differ from the base model's (extra {extra}, missing {missing}).")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=str(out.parent)))
    try:
        merged.save_pretrained(tmp)
        for name in PROCESSOR_FILES:  # the processor (and, for OpenVLA, its remote code) travels
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        for py in base.glob("*.py"):
            shutil.copy2(py, tmp / py.name)
        unnorm_keys = []
        stats = _find_stats(adapter)
        if stats is not None:
            shutil.copy2(stats, tmp / STATS_NAME)
            unnorm_keys = fold_norm_stats(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"adapter": str(adapter), "base": str(base), "out": str(out), "unnorm_keys": unnorm_keys}


def _cmd_merge(args) -> int:
    out = args.out or Path(args.adapter).with_name(Path(args.adapter).name + "-merged")
    summary = merge_adapter(args.adapter, out, args.base, dtype=args.dtype)
    print(f"merged {summary['adapter']} into {summary['base']} -> {summary['out']}")
    if summary["unnorm_keys"]:
        keys = ", ".join(summary["unnorm_keys"])
        print(f"norm_stats merged into config.json; use unnorm_key={summary['unnorm_keys'][0]!r} (available: {keys})")
    else:
        print("no dataset_statistics.json found beside the adapter: pass unnorm stats yourself at inference")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("merge")
    p.add_argument("adapter", type=existing_dir, help="adapter directory (RUN/STEP) written by the patched finetune.py")
    p.add_argument(
        "--base",
        type=existing_dir,
        default=None,
        help="base model directory (default: the adapter's base_model_name_or_path)",
    )
    p.add_argument("--out", type=output_dir, default=None, help="output directory (default: ADAPTER-merged)")
    p.add_argument("--dtype", default="bfloat16", choices=dtypes.CHOICES, help="dtype to merge and save in")
    p.set_defaults(func=_cmd_merge)
    return p
