"""The ``datasets`` plugin: the paper's RLDS datasets in OpenVLA's registries, and an early dataset check."""

import logging
from dataclasses import dataclass
from typing import Any

from ...config import option
from .base import FinetunePlugin

logger = logging.getLogger(__name__)


@dataclass
class DatasetsConfig:
    register_paper: bool = option(
        True,
        "Register the paper's RLDS datasets (sft, warmup) in OpenVLA's dataset registries; upstream lacks them, "
        "and nothing else changes.",
    )
    check: bool = option(
        True,
        "Before the model loads, check that --dataset_name is registered and built under --data_root_dir.",
    )


class DatasetsPlugin(FinetunePlugin):
    """Registers the paper's datasets and fails on an unknown or unbuilt dataset before the 7B model loads."""

    name = "datasets"
    config_cls = DatasetsConfig

    def setup(self, cfg: Any, is_main_process: bool = True) -> None:
        from ..datasets import check_dataset, register_paper_datasets

        if self.config.register_paper:
            added = register_paper_datasets()
            if added and is_main_process:
                logger.info("registered the paper's RLDS datasets %s", added)
        root = str(getattr(cfg, "data_root_dir", ""))
        if not self.config.check or "://" in root:  # a remote build (gs://...) is tensorflow-datasets' to find
            return
        try:
            check_dataset(root, cfg.dataset_name)
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"{exc} (--datasets.check false skips this check.)") from exc
