"""Throughput of `eval run`'s policy against the reference's own path and against the floor.

Three paths, measured in one run on one checkpoint (random weights at the bench's scale, saved with the
reference's HF classes), the same frames and the same prompts:

(a) reference: BlindVLA's ``OpenVLAForActionPredictionWithValueHead.predict_action_batch`` from its
    ``prismatic/extern/hf`` (loaded from ``--reference-src`` at run time, as given; nothing of it is in this
    package), with the value head ``a0`` and greedy decoding, as RL4VLA's evaluation policy loads and calls it:
    ``generate`` with its ``AllowedTokensLogitsProcessor``, ``output_hidden_states=True``, ``output_logits=True``,
    at its constraint of equal-length prompts (one instruction for the batch, different frames);
(b) ours: ``vla.actions.ActionDecoder``, ``eval run``'s decoder (one prefill, six cached single-token steps,
    logits only at the last position and only for the 256 action tokens, no hidden states kept);
(c) the floor: the batch's multimodal prefill up to the last prompt position's logits over the 256 action rows,
    no decoding at all (``ActionDecoder.first_tokens``).

(a) and (b) must choose the same action tokens; the bench stops if they do not. Rounds interleave the paths; the
median round of each counts. The CPU scale shrinks the LLM (width 512) but not the vocabulary (32064, which the
reference hard-codes), so full-vocabulary logits weigh far more here than at 7B: :func:`analytic_7b` gives what
the reference spends beyond the floor at OpenVLA-7B's widths, which is the figure to trust for a GPU.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..vla.actions import ACTION_DIM
from .model import CPU_SCALE, OPENVLA_7B, PROMPT_TEXT, VISUAL_TOKENS, Scale

PATHS = ("reference", "ours", "floor")
REFERENCE_CLASS = "modeling_prismatic.OpenVLAForActionPredictionWithValueHead"
INSTRUCTION = "put the carrot on the plate"
UNNORM_KEY = "bench"


def reference_files(src) -> Path:
    """The reference's ``prismatic/extern/hf`` under ``src`` (a BlindVLA checkout or its ``openvla/`` folder)."""
    src = Path(src)
    for root in (src, src / "openvla"):
        hf = root / "prismatic" / "extern" / "hf"
        if (hf / "modeling_prismatic.py").is_file():
            if "def predict_action_batch" not in (hf / "modeling_prismatic.py").read_text():
                raise ValueError(
                    f"{hf / 'modeling_prismatic.py'} has no predict_action_batch: --reference-src must be a checkout "
                    "of CognitiveAISystems/BlindVLA (its openvla/ folder), not OpenVLA's"
                )
            return root
    raise FileNotFoundError(
        f"--reference-src {src} holds no prismatic/extern/hf/modeling_prismatic.py: pass a checkout of "
        "CognitiveAISystems/BlindVLA (or its openvla/ folder)"
    )


def _build(src: Path, scale: Scale, directory: Path) -> Path:
    from ..tiny.openvla import bounds_stats, build_tiny_openvla_checkpoint

    stats = {UNNORM_KEY: {"action": bounds_stats(np.random.default_rng(0), ACTION_DIM)}}
    return build_tiny_openvla_checkpoint(
        directory,
        src=src,
        dataset=UNNORM_KEY,
        hidden_size=scale.llm.width,
        num_layers=scale.llm.depth,
        intermediate_size=scale.llm.mlp,
        num_heads=8,
        norm_stats=stats,
    )


class Reference:
    """The reference's policy model on the bench's checkpoint, called as RL4VLA's evaluation calls it."""

    def __init__(self, checkpoint: Path, device: str):
        import transformers
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls = get_class_from_dynamic_module(REFERENCE_CLASS, str(checkpoint))
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the value head is not in the checkpoint: initialised, as RL4VLA's
        try:  # (its constructor prints "Using value head mode: a0")
            self.model = cls.from_pretrained(checkpoint, vh_mode="a0", torch_dtype=torch.float32).to(device).eval()
        finally:
            transformers.logging.set_verbosity(verbosity)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> np.ndarray:
        _, ids, _ = self.model.predict_action_batch(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixel_values,
            unnorm_key=UNNORM_KEY,
            do_sample=False,
        )
        return ids.cpu().numpy()


def _pixels(checkpoint: Path, frames: np.ndarray, device: str) -> torch.Tensor:
    """The frames through the reference's image processor (uint8 (B, C, H, W) tensors, as its evaluation feeds
    the environment's frames): one tensor that all three paths are given."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    images = torch.as_tensor(frames).permute(0, 3, 1, 2)
    return torch.as_tensor(processor(images, return_tensors="pt")["pixel_values"]).to(device, torch.float32)


def policy_throughput(
    reference_src,
    scale: Scale = CPU_SCALE,
    batches: Sequence[int] = (1, 8, 64),
    rounds: int = 3,
    device: str = "cpu",
) -> Dict:
    """Actions/s of the three paths at each batch size, and their ratios; (a) and (b) checked token for token.

    Every path gets the same token ids (BOS + the prompt + "▁", equal length: one instruction) and the same pixel
    values, so the figures compare the models' paths, not preprocessing."""
    from ..vla.actions import ActionDecoder
    from ..vla.checkpoint import load_vla

    src = reference_files(reference_src)
    with tempfile.TemporaryDirectory(prefix="openvla-align-policy-bench-") as tmp:
        try:
            checkpoint = _build(src, scale, Path(tmp) / "checkpoint")
            reference = Reference(checkpoint, device)
        except ImportError as exc:
            import transformers

            raise RuntimeError(
                f"the reference's HF classes do not import with transformers {transformers.__version__} ({exc}): "
                "they were written for OpenVLA's pins; run bench --policy in an OpenVLA environment "
                "(transformers 4.40.1)"
            ) from exc
        # as eval run loads it: the checkpoint's default attention (attn_implementation=None), as the reference's
        ours = ActionDecoder(load_vla(checkpoint, device=device, dtype="float32", attn_implementation=None))
        frames = np.random.default_rng(0).integers(0, 256, (max(batches), 224, 224, 3), dtype=np.uint8)
        pixels = _pixels(checkpoint, frames, device)
        row = ours.rows([INSTRUCTION])[0]
        ids = torch.tensor([row] * len(frames), device=device)
        calls = {
            "reference": lambda n: reference(ids[:n], pixels[:n]),
            "ours": lambda n: ours.decode([row] * n, pixels[:n]),
            "floor": lambda n: ours.first_tokens([row] * n, pixels[:n]),
        }
        for call in calls.values():  # warm-up
            call(2)
        attention = {
            "reference": reference.model.language_model.config._attn_implementation,
            "ours": ours.loaded.attn_implementation(),
        }
        result: Dict = {
            "scale": scale.name,
            "rounds": rounds,
            "prompt_tokens": len(row),
            "attention": attention,
            "batches": {},
        }
        for batch in batches:
            times: Dict[str, List[float]] = {p: [] for p in PATHS}
            tokens = {}
            for r in range(rounds):
                for path in PATHS if r % 2 == 0 else PATHS[::-1]:
                    start = time.perf_counter()
                    tokens[path] = calls[path](batch)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[path].append(time.perf_counter() - start)
            differ = int((tokens["reference"] != tokens["ours"]).any(axis=1).sum())
            if differ or not (tokens["floor"] == tokens["ours"][:, 0]).all():
                raise RuntimeError(
                    f"at batch {batch} the reference's predict_action_batch and eval run's policy chose different "
                    f"action tokens in {differ} of {batch} rows: the comparison is void"
                )
            median = {p: statistics.median(t) for p, t in times.items()}
            result["batches"][str(batch)] = {
                "actions_per_s": {p: round(batch / median[p], 3) for p in PATHS},
                "seconds": {p: [round(t, 4) for t in times[p]] for p in PATHS},
                "ours_vs_reference": round(median["reference"] / median["ours"], 3),  # > 1: ours faster
                # the same ratio in each round (the paths of a round ran back to back): its lowest and highest
                "ours_vs_reference_range": _range(times["reference"], times["ours"]),
                "ours_over_floor_range": _range(times["ours"], times["floor"]),
                "ours_over_floor": round(median["ours"] / median["floor"], 3),  # time ratio, >= 1
                "reference_over_floor": round(median["reference"] / median["floor"], 3),
                "identical_tokens": True,
            }
    result["analytic_7b"] = analytic_7b()
    return result


def _range(numerator: List[float], denominator: List[float]) -> List[float]:
    ratios = [n / d for n, d in zip(numerator, denominator)]
    return [round(min(ratios), 3), round(max(ratios), 3)]


def analytic_7b(scale: Scale = OPENVLA_7B, batch: int = 64, prompt: int = PROMPT_TEXT + 1) -> Dict[str, float]:
    """At OpenVLA-7B's widths: FLOPs of the floor, of our six decode steps and of the reference's extras (full-
    vocabulary logits at every prompt position and at every step), as fractions of the floor, and the bytes the
    reference keeps (every layer's hidden states, full logits in fp32) for a batch."""
    llm, vocab = scale.llm, scale.vocab
    seq = 1 + VISUAL_TOKENS + prompt  # BOS, visual tokens, prompt text and "▁"
    per_token = 2.0 * (4 * llm.width**2 + 3 * llm.width * llm.mlp) * llm.depth  # matmuls per token
    prefill = seq * per_token + 2.0 * llm.depth * seq * seq * llm.width  # + attention (scores and weighted sum)
    floor = scale.vision_flops + prefill + 2.0 * llm.width * 256
    steps = sum(per_token + 4.0 * llm.depth * (seq + t) * llm.width + 2.0 * llm.width * 256 for t in range(6))
    full_logits = 2.0 * llm.width * vocab * (seq + 6) - 2.0 * llm.width * 256 * 7
    hidden_bytes = (llm.depth + 1) * (seq + 6) * llm.width * 2 * batch  # bf16, every layer, kept by generate
    logits_bytes = (seq + 6) * vocab * 4 * batch  # the prefill's full logits, cast to fp32 by Llama's forward
    # generate's cache grows by concatenation: each step reads and writes every layer's keys and values (bf16);
    # ours copies the prefill's cache once into preallocated buffers and then writes one position per step
    cache_copies = sum(2 * 2 * llm.depth * (seq + t) * llm.width * 2 * batch for t in range(1, 7))
    ours_copy = 2 * 2 * llm.depth * seq * llm.width * 2 * batch
    a100 = 2.0e12 * batch * floor / 312e12  # bytes an A100 moves (2.0 TB/s) in the floor's time (312 TFLOP/s bf16)
    return {
        "floor_gflop_per_sample": round(floor / 1e9, 1),
        "ours_extra_over_floor": round(steps / floor, 4),
        "reference_extra_over_floor": round((steps + full_logits) / floor, 4),
        "reference_extra_gb_per_batch": round((hidden_bytes + logits_bytes) / 1e9, 2),
        "reference_cache_copy_gb_per_batch": round(cache_copies / 1e9, 1),
        "ours_cache_copy_gb_per_batch": round(ours_copy / 1e9, 1),
        # at an A100's peaks: the copies' time as a fraction of the floor's
        "reference_cache_copy_over_floor_a100": round(cache_copies / a100, 3),
        "ours_cache_copy_over_floor_a100": round(ours_copy / a100, 3),
        # a decode step of the batch reads every LLM weight once (bf16): on a GPU the six steps are bound by that
        "steps_weight_read_over_floor_a100": round(6 * llm.params() * 2 / a100, 3),
        "batch": batch,
    }


def format_policy(result: Dict) -> str:
    lines = [
        f"eval policy vs the reference's predict_action_batch ({result['scale']}, vocabulary 32064; median of "
        f"{result['rounds']} interleaved rounds; identical action tokens checked; attention: reference "
        f"{result['attention']['reference']}, ours {result['attention']['ours']}):",
        f"{'batch':>6} {'reference':>12} {'ours':>12} {'floor':>12}   {'ours/ref speed (rounds)':>24} "
        f"{'ours/floor time (rounds)':>25}",
    ]
    for batch, r in result["batches"].items():
        a = r["actions_per_s"]
        (lo_ref, hi_ref), (lo_floor, hi_floor) = r["ours_vs_reference_range"], r["ours_over_floor_range"]
        lines.append(
            f"{batch:>6} {a['reference']:>10.2f}/s {a['ours']:>10.2f}/s {a['floor']:>10.2f}/s   "
            f"{r['ours_vs_reference']:>6.2f}x ({lo_ref:.2f}-{hi_ref:.2f}) "
            f"{' ' * 7}{r['ours_over_floor']:>6.3f}x ({lo_floor:.3f}-{hi_floor:.3f})"
        )
    a7 = result["analytic_7b"]
    lines += [
        f"OpenVLA-7B shapes (analytic, batch {a7['batch']}): floor {a7['floor_gflop_per_sample']} GFLOP per sample; "
        f"beyond it, ours +{a7['ours_extra_over_floor']:.1%} (six cached steps), the reference "
        f"+{a7['reference_extra_over_floor']:.1%} (the same steps plus full-vocabulary logits at every position) "
        f"and {a7['reference_extra_gb_per_batch']} GB kept (every layer's hidden states, fp32 logits); key/value "
        f"cache copies over the six steps: the reference {a7['reference_cache_copy_gb_per_batch']} GB (growing it), "
        f"ours {a7['ours_cache_copy_gb_per_batch']} GB (preallocating once): "
        f"{a7['reference_cache_copy_over_floor_a100']:.1%} and {a7['ours_cache_copy_over_floor_a100']:.1%} of the "
        "floor's time at an A100's peaks (312 TFLOP/s bf16, 2.0 TB/s); the six steps' weight reads: "
        f"{a7['steps_weight_read_over_floor_a100']:.1%} (both)",
    ]
    return "\n".join(lines)
