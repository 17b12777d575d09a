"""The ``norm_stats`` plugin: every merged model carries the run's dataset statistics in its ``config.json``, so
``predict_action(..., unnorm_key=...)`` works on it as saved, aligned or not (the SFT and Freeze baselines are
evaluated the same way)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from ...config import option
from ..merge import STATS_NAME, fold_norm_stats
from .base import FinetunePlugin


@dataclass
class NormStatsConfig:
    fold: bool = option(
        True,
        "Fold the run's dataset_statistics.json into every merged model's config.json (norm_stats), so "
        "predict_action(..., unnorm_key=...) works on the merged model as saved.",
    )


class NormStatsPlugin(FinetunePlugin):
    name = "norm_stats"
    config_cls = NormStatsConfig

    def __init__(self, config: NormStatsConfig):
        super().__init__(config)
        self.unnorm_keys: List[str] = []  # folded into the merged models' config.json
        self.is_main_process = True
        self.dataset_name: Optional[str] = None
        self.saved = False

    def setup(self, cfg: Any, is_main_process: bool = True) -> None:
        self.is_main_process = is_main_process
        self.dataset_name = getattr(cfg, "dataset_name", None)

    def on_save(self, save_dir: Path, is_main_process: bool = True) -> None:
        self.saved = self.saved or is_main_process

    def on_merged(self, merged_dir: Path) -> None:
        """Fold ``dataset_statistics.json`` beside the merged model into its ``config.json`` (atomically; a bad
        statistics file raises and changes nothing)."""
        if self.config.fold and (Path(merged_dir) / STATS_NAME).is_file():
            self.unnorm_keys = fold_norm_stats(merged_dir)

    def on_end(self) -> None:
        if not (self.is_main_process and self.config.fold):
            return
        if self.unnorm_keys:
            keys = ", ".join(self.unnorm_keys)
            print(
                f"[openvla-align] norm_stats are in the merged model's config.json: use "
                f"unnorm_key={self.unnorm_keys[0]!r} (available: {keys})"
            )
        elif self.saved:
            print(
                "[openvla-align] adapters only (no merged model): merge one with `openvla-align merge <checkpoint "
                f"dir>`; it folds the dataset statistics into config.json (unnorm_key={self.dataset_name!r})"
            )
