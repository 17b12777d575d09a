"""`openvla-align bench`: what alignment costs per training step, measured against plain LoRA SFT.

Four ways to run a step, on one model, interleaved round by round so that drift (thermal, other load) hits them all:

  sft        the action loss only (what the stock finetune.py computes)
  live       + alignment with the teacher run on every batch (openvla-align's hook, one layer)
  cache      + alignment with targets read from a teacher feature cache (no teacher at all)
  reference  the reference implementation's approach: ``output_hidden_states=True`` (every layer returned), the
             layer sliced from that tuple, plus the live teacher

``--policy`` instead measures evaluation: ``eval run``'s policy against the reference's ``predict_action_batch`` and
the prefill floor (``policy.py``).

The model is OpenVLA-7B + C-RADIOv3-L scaled down so that it runs on a CPU: widths / 8 and depths / 4 for every
component, the same 256 visual tokens per image and the same prompt length, so the vision : LLM : teacher FLOP
proportions stay close to the full-size ones (both are printed). ``--family openvla-oft`` gives the same model
OpenVLA-OFT's LIBERO inputs and step: two cameras (512 visual tokens, the teacher on each image), a proprio token,
a chunk of 8 x 7 action tokens decoded in one forward, every layer's hidden states returned (as OFT's finetune.py
asks) and an L1-regression action head on the last layer's action states. Step time is the median over all timed steps;
peak memory is measured per mode in a fresh process (CUDA: ``max_memory_allocated``; CPU: peak resident memory
above the process's footprint before the model is built). An analytic estimate gives the same ratios at 7B scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..argtypes import existing_dir, int_list, positive_int
from .memory import memory_modes, peak_memory  # noqa: F401
from .model import (  # noqa: F401
    CPU_SCALE,
    FULL_SCALES,
    MODES,
    OFT_7B,
    OPENVLA_7B,
    SCALES,
    SMOKE_SCALE,
    Runner,
    Scale,
    Tower,
    analytic,
    batches,
    build,
    build_bench_cache,
    build_heads,
    frames,
    oft,
)
from .policy import format_policy, policy_throughput  # noqa: F401


# --------------------------------------------------------------------------------------------------- measurements
def time_modes(
    modes=MODES,
    rounds: int = 3,
    steps: int = 4,
    warmup: int = 1,
    batch_size: int = 2,
    device: str = "cpu",
    scale: Scale = CPU_SCALE,
) -> Dict[str, object]:
    """Median step time per mode, modes interleaved in a rotating order each round."""
    from ..targets.cache import TeacherCache

    torch.manual_seed(0)
    vla, teacher = build(scale, device=device)
    heads = build_heads(scale, device=device)
    vla.train()
    with tempfile.TemporaryDirectory() as tmp:
        build_info = build_bench_cache(teacher, Path(tmp) / "cache", device=device)
        cache = TeacherCache(Path(tmp) / "cache")
        runners = {m: Runner(m, vla, teacher, cache, scale, device, heads) for m in modes}
        data = batches(scale, batch_size)
        times: Dict[str, List[float]] = {m: [] for m in modes}
        for r in range(rounds):
            order = list(modes[r % len(modes) :]) + list(modes[: r % len(modes)])
            for mode in order:
                with runners[mode] as runner:
                    for s in range(warmup + steps):
                        batch = next(data)
                        t0 = time.perf_counter()
                        runner.step(batch)
                        if s >= warmup:
                            times[mode].append(time.perf_counter() - t0)
    medians = {m: statistics.median(v) for m, v in times.items()}
    return {
        "median_s": medians,
        "ratio": {m: medians[m] / medians["sft"] for m in modes},
        "ratio_ci95": {m: ratio_ci(times[m], times["sft"]) for m in modes},
        "steps": {m: len(v) for m, v in times.items()},
        "cache_build": build_info,
    }


def ratio_ci(times: List[float], base: List[float], resamples: int = 2000, seed: int = 0) -> List[float]:
    """95 % bootstrap interval of median(times) / median(base): both samples resampled with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t, b = np.asarray(times), np.asarray(base)
    ratios = np.median(rng.choice(t, (resamples, t.size)), axis=1) / np.median(
        rng.choice(b, (resamples, b.size)), axis=1
    )
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


# --------------------------------------------------------------------------------------------------- report
def run(
    rounds: int = 3,
    steps: int = 4,
    batch_size: int = 2,
    device: str = "cpu",
    out: Optional[str] = None,
    memory: bool = True,
    scale: str = "cpu",
    family: str = "openvla",
) -> Dict[str, object]:
    key = scale_key(scale, family)
    small, big = SCALES[key], FULL_SCALES[family]
    result = {
        "machine": {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()},
        "settings": {"rounds": rounds, "steps": steps, "batch_size": batch_size, "scale": scale, "family": family},
        "scales": {
            "cpu": {"name": small.name, "proportions": small.proportions(), **_shape(small)},
            "7b": {"name": big.name, "proportions": big.proportions(), **_shape(big)},
        },
        "time": time_modes(rounds=rounds, steps=steps, batch_size=batch_size, device=device, scale=small),
        "memory": memory_modes(device=device, batch_size=batch_size, scale=key) if memory else None,
        "analytic_7b": analytic(big),
    }
    if out:
        from .._io import atomic_write_bytes

        atomic_write_bytes(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    return result


def scale_key(scale: str, family: str = "openvla") -> str:
    """The ``SCALES`` entry for a size (``cpu``/``smoke``) and a model family (``openvla``/``openvla-oft``)."""
    if family not in FULL_SCALES:
        raise ValueError(f"family={family!r}: the bench knows {sorted(FULL_SCALES)}")
    return scale if family == "openvla" else f"oft-{scale}"


def _shape(scale: Scale) -> dict:
    towers = {k: asdict(getattr(scale, k)) for k in ("dino", "siglip", "llm", "teacher")}
    return {
        **towers,
        "family": scale.family,
        "images": scale.images,
        "visual_tokens": scale.visual_tokens,
        "action_tokens": scale.chunk * 7,
    }


def format_report(result: Dict[str, object]) -> str:
    cpu, big = result["scales"]["cpu"]["proportions"], result["scales"]["7b"]["proportions"]
    shape = result["scales"]["cpu"]
    lines = [
        f"{result['scales']['7b']['name']}: {shape.get('images', 1)} image(s) = {shape.get('visual_tokens', 256)} "
        f"visual tokens, {shape.get('action_tokens', 7)} action tokens per forward, {shape['llm']['tokens']} in all",
        "FLOP proportions (vision : LLM : teacher, forward per sample)",
        f"  7B scale  {big['vision']:.3f} : 1 : {big['teacher']:.3f}",
        f"  measured  {cpu['vision']:.3f} : 1 : {cpu['teacher']:.3f}  ({shape['name']})",
        "",
        f"{'mode':<10} {'step (ms)':>10} {'x SFT':>7} {'95% CI':>13} {'peak mem (MB)':>14} {'x SFT':>7} "
        f"{'7B time x':>10} {'7B mem x':>9}",
    ]
    t, m, a = result["time"], result["memory"], result["analytic_7b"]
    for mode in MODES:
        mem = f"{m['peak_bytes'][mode] / 2**20:>14.1f} {m['ratio'][mode]:>7.3f}" if m else f"{'-':>14} {'-':>7}"
        lo, hi = t.get("ratio_ci95", {}).get(mode, (float("nan"),) * 2)
        lines.append(
            f"{mode:<10} {t['median_s'][mode] * 1e3:>10.1f} {t['ratio'][mode]:>7.3f} {f'{lo:.3f}-{hi:.3f}':>13} {mem} "
            f"{a['time'][mode]:>10.3f} {a['memory'][mode]:>9.3f}"
        )
    cb = t["cache_build"]
    lines += [
        "",
        f"cache builder: {cb['teacher_frames_per_s']} frames/s of teacher inference ({cb['frames_per_s']} overall)",
        f"timed steps per mode: {t['steps']['sft']} (median; 95% CI of the ratio: bootstrap over steps); "
        "7B columns: analytic, batch 8, bf16, LoRA r=32",
        f"peak memory: {m['measure']} above the footprint before the model was built" if m else "",
    ]
    return "\n".join(lines)


def _cmd_bench(args) -> int:
    if args.policy:
        if args.family != "openvla":
            raise SystemExit(
                "bench --policy measures OpenVLA's token-by-token action decoding (eval run's policy); OpenVLA-OFT "
                "decodes its whole action chunk in one forward. Drop --family, or drop --policy to time OFT's "
                "training step."
            )
        if args.reference_src is None:
            raise SystemExit(
                "bench --policy compares eval run's policy with the reference's predict_action_batch: pass "
                "--reference-src, a checkout of CognitiveAISystems/BlindVLA (or its openvla/ folder)"
            )
        result = policy_throughput(
            args.reference_src, SCALES[args.scale], args.policy_batches, args.rounds, args.device
        )
        print(format_policy(result))
        if args.out:
            from .._io import atomic_write_bytes

            atomic_write_bytes(Path(args.out), (json.dumps(result, indent=2) + "\n").encode())
            print(f"wrote {args.out}")
        return 0
    result = run(
        args.rounds,
        args.steps,
        args.batch_size,
        args.device,
        args.out,
        memory=not args.no_memory,
        scale=args.scale,
        family=args.family,
    )
    print(format_report(result))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (each runs every mode once)")
    p.add_argument(
        "--steps", type=positive_int, default=4, help="timed steps per mode per round (after one warm-up step)"
    )
    p.add_argument("--batch-size", type=positive_int, default=2, help="samples per training step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", default="bench.json", help="JSON with every figure, for later comparison")
    p.add_argument("--no-memory", action="store_true", help="skip the per-mode memory processes")
    p.add_argument("--scale", default="cpu", choices=("cpu", "smoke"), help="model size (smoke: seconds, for tests)")
    p.add_argument(
        "--family",
        default="openvla",
        choices=sorted(FULL_SCALES),
        help="openvla: one image, 7 action tokens; openvla-oft: OFT's LIBERO step (2 images, proprio, an 8x7 "
        "action chunk, L1 head)",
    )
    p.add_argument(
        "--policy",
        action="store_true",
        help="instead: eval run's policy against the reference's predict_action_batch and the prefill floor",
    )
    p.add_argument(
        "--policy-batches",
        type=int_list,
        default=[1, 8, 64],
        help="frames per policy call, comma-separated (the reference evaluates 64 at a time)",
    )
    p.add_argument(
        "--reference-src",
        type=existing_dir,
        default=None,
        help="for --policy: a checkout of CognitiveAISystems/BlindVLA (its openvla/prismatic/extern/hf is loaded)",
    )
    p.set_defaults(func=_cmd_bench)
    return p
