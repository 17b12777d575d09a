"""`openvla-align bench`: what alignment costs per training step, measured against plain LoRA SFT.

Four ways to run a step, on one model, interleaved step by step (the order rotated each round) so that drift
(thermal, other load) hits them all alike, and each mode's time is compared with SFT's of the same step:

  sft        the action loss only (what the stock finetune.py computes)
  live       + alignment with the teacher run on every batch (openvla-align's hook, one layer)
  cache      + alignment with targets read from a teacher feature cache (no teacher at all)
  reference  the reference implementation's approach: ``output_hidden_states=True`` (every layer returned), the
             layer sliced from that tuple, plus the live teacher

At OpenVLA-OFT's shapes two more: Spatial Forcing's recipe (VGGT-1B's aggregator at the same scale, both cameras of
a sample through it together, its layer, projector, loss, teacher input and pooling), live (``live-vggt``) and from a
multi-view cache (``cache-vggt``).

``--policy`` instead measures evaluation: ``eval run``'s policy against the reference's ``predict_action_batch`` and
the prefill floor (``policy.py``).

The model is OpenVLA-7B + C-RADIOv3-L scaled down so that it runs on a CPU: widths / 8 and depths / 4 for every
component, the same 256 visual tokens per image and the same prompt length, so the vision : LLM : teacher FLOP
proportions stay close to the full-size ones (both are printed). ``--family openvla-oft`` gives the same model
OpenVLA-OFT's LIBERO inputs and step: two cameras (512 visual tokens, the teacher on each image), a proprio token,
a chunk of 8 x 7 action tokens decoded in one forward, every layer's hidden states returned (as OFT's finetune.py
asks) and an L1-regression action head on the last layer's action states. Step time is the median over all timed steps,
its ratio to SFT the median of the per-step ratios (each mode against SFT's step on the same batch, moments apart);
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
    OFT_7B_VGGT,
    OPENVLA_7B,
    RECIPES,
    SCALES,
    SMOKE_SCALE,
    VGGT_1B,
    VGGT_CPU,
    VGGT_MODES,
    Runner,
    Scale,
    Tower,
    VGGTTower,
    align_config,
    analytic,
    batches,
    bench_samples,
    bench_sources,
    build,
    build_bench_cache,
    build_bench_teacher,
    build_heads,
    family_modes,
    frames,
    mode_scale,
    oft,
    with_vggt,
)
from .policy import format_policy, policy_throughput  # noqa: F401

# --------------------------------------------------------------------------------------------------- measurements
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_modes(
    modes=MODES,
    rounds: int = 3,
    steps: int = 4,
    warmup: int = 1,
    batch_size: int = 2,
    device: str = "cpu",
    scale: Scale = CPU_SCALE,
    clock: str = "wall",
) -> Dict[str, object]:
    """Step time per mode: every step runs each mode once on the same batch, in an order rotated each round (after
    ``warmup`` untimed steps of every mode); ratio to SFT = the median over steps of time / SFT's time that step.
    ``clock``: ``wall`` (what a step costs) or ``cpu`` (this process's CPU time, all threads: on a machine shared
    with other work, with one thread, it does not count the time other processes hold the cores)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r}: choose one of {sorted(CLOCKS)}.")
    now = CLOCKS[clock]
    torch.manual_seed(0)
    vla, teacher = build(scale, device=device)
    heads = build_heads(scale, device=device)
    vla.train()
    with tempfile.TemporaryDirectory() as tmp:
        sources = bench_sources(modes, scale, teacher, Path(tmp), batch_size, device)
        runners = {}
        for m in modes:
            at = mode_scale(scale, m)
            t, cache, _ = sources[at.teacher_name]
            runners[m] = Runner(m, vla, t, cache, at, device, heads)
        data = batches(scale, batch_size)
        times: Dict[str, List[float]] = {m: [] for m in modes}
        for r in range(rounds):
            order = list(modes[r % len(modes) :]) + list(modes[: r % len(modes)])
            for s in range((warmup if r == 0 else 0) + steps):
                batch = next(data)
                for mode in order:
                    with runners[mode] as runner:
                        t0 = now()
                        runner.step(batch)
                        if r > 0 or s >= warmup:
                            times[mode].append(now() - t0)
    medians = {m: statistics.median(v) for m, v in times.items()}
    paired = {m: [t / b for t, b in zip(times[m], times["sft"])] for m in modes}
    builds = {name: info for name, (_, _, info) in sources.items()}
    return {
        "median_s": medians,
        "ratio": {m: statistics.median(paired[m]) for m in modes},
        "ratio_ci95": {m: ratio_ci(paired[m]) for m in modes},
        "ratio_of_medians": {m: medians[m] / medians["sft"] for m in modes},
        "steps": {m: len(v) for m, v in times.items()},
        "times_s": times,  # every timed step, in order (step j of every mode ran on the same batch)
        "clock": clock,
        "cache_build": builds[scale.teacher_name],
        "cache_builds": builds,
    }


def ratio_ci(paired: List[float], resamples: int = 2000, seed: int = 0) -> List[float]:
    """95 % bootstrap interval of the median of per-step ratios (the steps resampled with replacement)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    r = np.asarray(paired)
    medians = np.median(rng.choice(r, (resamples, r.size)), axis=1)
    return [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]


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
    clock: str = "wall",
) -> Dict[str, object]:
    key = scale_key(scale, family)
    small, big = SCALES[key], FULL_SCALES[family]
    modes = family_modes(family)
    scales = {
        "cpu": {"name": small.name, "proportions": small.proportions(), **_shape(small)},
        "7b": {"name": big.name, "proportions": big.proportions(), **_shape(big)},
    }
    estimate = analytic(big)
    if any(m in VGGT_MODES for m in modes):
        small_v, big_v = with_vggt(small), OFT_7B_VGGT if big is OFT_7B else with_vggt(big)
        scales["cpu-vggt"] = {"name": small_v.name, "proportions": small_v.proportions(), **_shape(small_v)}
        scales["7b-vggt"] = {"name": big_v.name, "proportions": big_v.proportions(), **_shape(big_v)}
        vggt = analytic(big_v)
        for part in ("time", "memory"):
            estimate[part].update({f"{m}-vggt": vggt[part][m] for m in ("live", "cache")})
        estimate["memory_gb"]["sft-vggt"] = vggt["memory_gb"]["sft"]
    result = {
        "machine": {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()},
        "settings": {
            "rounds": rounds,
            "steps": steps,
            "batch_size": batch_size,
            "scale": scale,
            "family": family,
            "clock": clock,
        },
        "modes": list(modes),
        "scales": scales,
        "time": time_modes(
            modes, rounds=rounds, steps=steps, batch_size=batch_size, device=device, scale=small, clock=clock
        ),
        "memory": memory_modes(modes, device=device, batch_size=batch_size, scale=key) if memory else None,
        "analytic_7b": estimate,
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
        "teacher_name": scale.teacher_name,
        "recipe": scale.recipe,
        "layer": scale.layer,
    }


def format_report(result: Dict[str, object]) -> str:
    scales = result["scales"]
    cpu, big = scales["cpu"]["proportions"], scales["7b"]["proportions"]
    shape = scales["cpu"]
    lines = [
        f"{scales['7b']['name']}: {shape.get('images', 1)} image(s) = {shape.get('visual_tokens', 256)} "
        f"visual tokens, {shape.get('action_tokens', 7)} action tokens per forward, {shape['llm']['tokens']} in all",
        "FLOP proportions (vision : LLM : teacher, forward per sample)",
        f"  7B scale  {big['vision']:.3f} : 1 : {big['teacher']:.3f}",
        f"  measured  {cpu['vision']:.3f} : 1 : {cpu['teacher']:.3f}  ({shape['name']})",
    ]
    if "7b-vggt" in scales:
        v_big, v_cpu = scales["7b-vggt"], scales["cpu-vggt"]
        t_big, t_cpu = v_big["teacher"], v_cpu["teacher"]
        lines += [
            f"{v_big['name']}: both cameras through VGGT together ({t_big['resolution']} px, "
            f"{t_big['tokens']} tokens per frame), LLM layer {v_big['layer']}, Spatial Forcing's projector, loss, "
            "input and pooling",
            f"  7B scale  {v_big['proportions']['vision']:.3f} : 1 : {v_big['proportions']['teacher']:.3f}  "
            f"(VGGT-1B: width {t_big['width']}, {t_big['depth']} frame + {t_big['depth']} global blocks, patch "
            f"embedding {t_big['embed_depth']} blocks)",
            f"  measured  {v_cpu['proportions']['vision']:.3f} : 1 : {v_cpu['proportions']['teacher']:.3f}  "
            f"(width {t_cpu['width']}, {t_cpu['depth']} + {t_cpu['depth']} blocks, embedding {t_cpu['embed_depth']}, "
            f"{t_cpu['resolution']} px, LLM layer {v_cpu['layer']})",
        ]
    t, m, a = result["time"], result["memory"], result["analytic_7b"]
    lines += [
        "",
        f"{'mode':<10} {'step (ms)' if t.get('clock', 'wall') == 'wall' else 'CPU (ms)':>10} {'x SFT':>7} "
        f"{'95% CI':>13} {'peak mem (MB)':>14} {'x SFT':>7} "
        f"{'7B time x':>10} {'7B mem x':>9}",
    ]
    for mode in result.get("modes", MODES):
        mem = f"{m['peak_bytes'][mode] / 2**20:>14.1f} {m['ratio'][mode]:>7.3f}" if m else f"{'-':>14} {'-':>7}"
        lo, hi = t.get("ratio_ci95", {}).get(mode, (float("nan"),) * 2)
        lines.append(
            f"{mode:<10} {t['median_s'][mode] * 1e3:>10.1f} {t['ratio'][mode]:>7.3f} {f'{lo:.3f}-{hi:.3f}':>13} {mem} "
            f"{a['time'][mode]:>10.3f} {a['memory'][mode]:>9.3f}"
        )
    lines.append("")
    for name, cb in t.get("cache_builds", {"": t["cache_build"]}).items():
        what = f" ({name})" if name else ""
        lines.append(
            f"cache builder{what}: {cb['teacher_frames_per_s']} frames/s of teacher inference "
            f"({cb['frames_per_s']} overall)"
        )
    lines += [
        f"timed steps per mode: {t['steps']['sft']} (median; x SFT: median of per-step ratios to SFT's step on the "
        "same batch, 95% CI: bootstrap over steps); 7B columns: analytic, batch 8, bf16, LoRA r=32",
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
        clock=args.clock,
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
    p.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall: step time; cpu: the process's CPU time (on a shared machine with OMP_NUM_THREADS=1 it leaves out "
        "the time other processes hold the cores)",
    )
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
