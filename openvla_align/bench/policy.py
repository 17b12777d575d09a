"""Throughput of `eval run`'s policy: KV-cached decoding vs a full forward per action token."""

from __future__ import annotations

import statistics
import time
from typing import Dict, List

import torch

from .model import CPU_SCALE, Scale, build


def policy_throughput(scale: Scale = CPU_SCALE, batch: int = 64, rounds: int = 3, device: str = "cpu") -> Dict:
    """Evaluation-policy throughput (actions/s): `eval run`'s KV-cached decoding vs re-running the whole multimodal
    forward per action token (the path before), on the same model, frames and prompts of several lengths, rounds
    interleaved; the median round of each counts."""
    import numpy as np

    from ..eval.run import BatchedPolicy
    from ..testing import build_tokenizer
    from ..vla.checkpoint import LoadedVLA
    from ..vla.layout import unwrap

    vla, _ = build(scale, device=device, with_teacher=False)
    stats = {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "mask": [True] * 6 + [False]}
    unwrap(vla).config.norm_stats = {"bench": {"action": stats}}
    policy = BatchedPolicy(LoadedVLA(vla.eval(), build_tokenizer(), 224, "bench"), "bench")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    texts = ["put the carrot on the plate", "put the red cup on the left plate", "put it on the board that is blue"]
    instructions = [texts[i % len(texts)] for i in range(batch)]
    times: Dict[str, List[float]] = {"kv_cache": [], "full_forward": []}
    for kv in (True, False):  # warm-up
        policy.action_tokens(images[:2], instructions[:2], kv_cache=kv)
    for r in range(rounds):
        for kv in (True, False) if r % 2 == 0 else (False, True):
            start = time.perf_counter()
            policy.action_tokens(images, instructions, kv_cache=kv)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times["kv_cache" if kv else "full_forward"].append(time.perf_counter() - start)
    per_s = {mode: batch / statistics.median(ts) for mode, ts in times.items()}
    return {
        "scale": scale.name,
        "batch": batch,
        "rounds": rounds,
        "actions_per_s": {k: round(v, 2) for k, v in per_s.items()},
        "speedup": round(per_s["kv_cache"] / per_s["full_forward"], 2),
    }


def format_policy(result: Dict) -> str:
    a = result["actions_per_s"]
    return (
        f"eval policy at batch {result['batch']} ({result['scale']}): KV cache {a['kv_cache']:.1f} actions/s, "
        f"full re-forward per token {a['full_forward']:.1f} actions/s: {result['speedup']:.2f}x"
    )
