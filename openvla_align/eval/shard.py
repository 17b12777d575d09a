"""Splitting an evaluation's (environment, seed) pairs over processes: torchrun ranks, ``--shard K/N`` jobs, or both.

* ``--shard K/N`` (``0 <= K < N``; e.g. a SLURM array's ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) takes every
  N-th pair of the recipe's full list, starting at the K-th. It splits the *full* list: jobs of an array start at
  different times, and a job that has already written results must not change what the others take.
* Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the ranks meet once (a gloo barrier) after each has
  listed what is missing on disk and before any writes, then split the *pending* pairs of their shard round-robin:
  a re-run with any number of ranks shares out just what is missing. Each rank runs on its own device
  (``cuda:LOCAL_RANK`` for ``--device cuda``) and meets the others again at the end, for rank 0's summary.

Results are written per pair, atomically, as each finishes: a rank that dies loses only its unfinished pairs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Sequence, Tuple, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place: its ``--shard`` and its torchrun rank."""

    shard: int = 0
    shards: int = 1
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, shard: Tuple[int, int] = (0, 1), environ=os.environ) -> "Ranks":
        world = int(environ.get("WORLD_SIZE", "1"))
        rank, local = int(environ.get("RANK", "0")), int(environ.get("LOCAL_RANK", environ.get("RANK", "0")))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}: start the ranks with torchrun")
        return cls(shard[0], shard[1], rank, world, local)

    def of_shard(self, pairs: Sequence[T]) -> List[T]:
        """This job's share of the recipe's full list of pairs (all of them without ``--shard``)."""
        return list(pairs[self.shard :: self.shards])

    def of_rank(self, pending: Sequence[T]) -> List[T]:
        """This rank's share of the shard's pending pairs."""
        return list(pending[self.rank :: self.world])

    @property
    def label(self) -> str:
        parts = [f"shard {self.shard}/{self.shards}"] if self.shards > 1 else []
        parts += [f"rank {self.rank}/{self.world}"] if self.world > 1 else []
        return ", ".join(parts)

    def device(self, device: str, cuda_count: int) -> str:
        """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; one fixed GPU for several
        ranks on a node is refused (they would share it, each with a full copy of the model)."""
        if self.world == 1 or not device.startswith("cuda"):
            return device
        if device != "cuda":
            raise ValueError(
                f"--device {device} for all {self.world} ranks would put every rank on the same GPU: pass --device "
                "cuda, and each rank takes cuda:LOCAL_RANK"
            )
        if self.local_rank >= cuda_count:
            raise ValueError(
                f"LOCAL_RANK {self.local_rank} but this node has {cuda_count} GPU(s): start at most {cuda_count} "
                "ranks per node (torchrun --nproc-per-node)"
            )
        return f"cuda:{self.local_rank}"


class Group:
    """The torchrun ranks' process group (gloo: barriers only, on any device); a no-op for one process."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.active = False
        if ranks.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # a rank may spend hours on its pairs before the closing barrier
                dist.init_process_group("gloo", timeout=timedelta(days=7))
                self.active = True

    def barrier(self) -> None:
        if self.ranks.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.active = False
