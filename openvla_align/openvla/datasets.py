"""The paper's RLDS datasets (``sft``, ``warmup``) registered into OpenVLA's dataset registries, plus an early check.

Upstream looks a dataset name up in ``OXE_DATASET_CONFIGS`` and ``OXE_STANDARDIZATION_TRANSFORMS``; the paper's
fork edits those files. We add the two entries at plugin load instead, so upstream stays untouched:
primary image key ``image``, no depth or proprioception, EEF-position actions, identity standardisation (the
episodes are already in OpenVLA's 7-D action convention).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Dict, List

PAPER_DATASETS = ("sft", "warmup")


def _identity(trajectory: Dict[str, Any]) -> Dict[str, Any]:
    return trajectory


def _registries():
    try:
        configs = importlib.import_module("prismatic.vla.datasets.rlds.oxe.configs")
        transforms = importlib.import_module("prismatic.vla.datasets.rlds.oxe.transforms")
        mixtures = importlib.import_module("prismatic.vla.datasets.rlds.oxe.mixtures")
    except ImportError as exc:
        raise ImportError(
            f"OpenVLA's `prismatic` package is not importable ({exc}); run inside an OpenVLA checkout/environment."
        ) from exc
    finally:
        keep_our_loggers()
    return configs, transforms, mixtures


def keep_our_loggers() -> None:
    """Importing ``prismatic`` runs ``logging.config.dictConfig(..., disable_existing_loggers=True)``, which silences
    every logger created before it, ours included; switch ours back on."""
    for name, item in list(logging.root.manager.loggerDict.items()):
        if name.split(".")[0] == "openvla_align" and isinstance(item, logging.Logger):
            item.disabled = False


def register_paper_datasets() -> List[str]:
    """Add ``sft`` and ``warmup`` where upstream does not define them; returns the names added."""
    configs, transforms, _ = _registries()
    added = []
    for name in PAPER_DATASETS:
        if name in configs.OXE_DATASET_CONFIGS:
            continue
        configs.OXE_DATASET_CONFIGS[name] = {
            "image_obs_keys": {"primary": "image"},
            "depth_obs_keys": {},
            "state_obs_keys": [],
            "state_encoding": configs.StateEncoding.NONE,
            "action_encoding": configs.ActionEncoding.EEF_POS,
        }
        transforms.OXE_STANDARDIZATION_TRANSFORMS.setdefault(name, _identity)
        added.append(name)
    return added


def check_dataset(data_root_dir, dataset_name: str) -> Path:
    """Fail before the model loads when ``dataset_name`` is unknown or not under ``data_root_dir``."""
    configs, _, mixtures = _registries()
    root = Path(data_root_dir)
    if dataset_name in mixtures.OXE_NAMED_MIXTURES:
        names = [name for name, _ in mixtures.OXE_NAMED_MIXTURES[dataset_name]]
    elif dataset_name in configs.OXE_DATASET_CONFIGS:
        names = [dataset_name]
    else:
        raise ValueError(
            f"--dataset_name {dataset_name!r} is neither a registered dataset nor a named mixture. The paper's "
            f"datasets are {', '.join(PAPER_DATASETS)}; upstream's are in prismatic/vla/datasets/rlds/oxe/configs.py."
        )
    missing = [name for name in names if not any((root / name).glob("*/dataset_info.json"))]
    if missing:
        raise FileNotFoundError(
            f"--data_root_dir {root} lacks the RLDS build of {missing}: expected {root}/{missing[0]}/<version>/"
            "dataset_info.json (a tensorflow-datasets build). Point --data_root_dir at the directory that holds them."
        )
    return root
