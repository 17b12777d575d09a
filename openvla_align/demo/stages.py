"""The demo's stages on the tiny OpenVLA-layout model: batches, training loops, evaluation.

Text follows OpenVLA's layout: BOS, the visual tokens (inserted by the model), ``In: ...?\\nOut:``, then the answer
(words for the VL stage, 7 action tokens for the robot task) and EOS; the loss is on the answer and EOS only.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ..hooks import VisualTokenHook
from ..tiny.data import answer_batch
from ..vla.actions import ActionDecoder, ActionTokenizer
from ..vla.checkpoint import LoadedVLA, action_prompt
from ..vla.pixels import normalize_fused
from .objectives import fit_dense, patch_targets
from .scenes import COLORS, SHADES, Scene, images, name, sort_action, sorted_right, where

ACTION_PROMPT = action_prompt("put the object in its bin")
REST = (-0.1, 0.0, 0.0, 0.0, 1.0)  # the action's other five dims (z, rotation, gripper): the same in every scene
VL_KINDS = ("colour", "shade", "where", "what")


def vl_example(scene: Scene, kind: str) -> Tuple[str, str]:
    """A question of ``kind`` about the scene's target and its answer. "what" needs a one-object scene and
    "colour"/"shade" an unambiguous one; otherwise the question becomes "where"."""
    target = scene.target
    shades = [o[1] for o in scene.objects]
    colours = [o[0] for o in scene.objects]
    if kind == "colour" and shades.count(target[1]) == 1:
        return f"What colour is the {target[1]} object", target[0]
    if kind == "shade" and colours.count(target[0]) == 1:
        return f"What shade is the {target[0]} object", target[1]
    if kind == "what" and len(scene.objects) == 1:
        return "What is on the table", name(target)
    return f"Where is the {name(target)}", where(int(scene.cells[0]))


def corpus() -> List[str]:
    """Every phrase the demo's tokenizer must know."""
    words = "What colour shade is the object Where is on the table top middle bottom left center right"
    return [f"{s} {c} {words}" for c in COLORS for s in SHADES] + [ACTION_PROMPT]


class Batcher:
    """Scenes -> OpenVLA-layout batches (right-padded; labels on the answer and EOS)."""

    def __init__(self, tokenizer, action_tokenizer: ActionTokenizer):
        self.tok = tokenizer
        self.act = action_tokenizer
        self._ids: Dict[str, List[int]] = {}
        self._lock = threading.Lock()  # a fast tokenizer must not be called from two threads at once

    def prompt_ids(self, prompt: str) -> List[int]:
        with self._lock:
            if prompt not in self._ids:
                self._ids[prompt] = self.tok(prompt).input_ids
            return self._ids[prompt]

    def action_ids(self, scene: Scene) -> List[int]:
        return self.act.encode(np.concatenate([sort_action(scene.target), REST]))

    def _rows(self, prompts: Sequence[str], answers: Sequence[Optional[List[int]]]) -> Dict[str, torch.Tensor]:
        return answer_batch([self.prompt_ids(p) for p in prompts], answers, self.tok)

    def vl(self, scenes: Sequence[Scene], kinds: Sequence[str]) -> Dict[str, torch.Tensor]:
        qa = [vl_example(s, k) for s, k in zip(scenes, kinds)]
        with self._lock:
            answers = [self.tok(" " + a, add_special_tokens=False).input_ids for _, a in qa]
        batch = self._rows([f"In: {q}?\nOut:" for q, _ in qa], answers)
        return {**batch, "pixel_values": normalize_fused(images(scenes))}

    def action(self, scenes: Sequence[Scene], with_answer: bool = True) -> Dict[str, torch.Tensor]:
        answers = [self.action_ids(s) if with_answer else None for s in scenes]
        batch = self._rows([ACTION_PROMPT] * len(scenes), answers)
        return {**batch, "pixel_values": normalize_fused(images(scenes))}


# --- training ---------------------------------------------------------------------------------------------------


def lora(vla, rank: int, seed: int, vision: bool = True):
    """OpenVLA's fine-tuning LoRA: every linear layer (vision, projector, LLM), rank ``rank``, seeded init;
    ``vision=False`` leaves the vision towers out (projector and LLM only)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = "all-linear" if vision else r".*(projector\.fc\d|language_model\.model\.layers\.\d+\..*_proj)"
    cfg = LoraConfig(
        r=rank, lora_alpha=min(rank, 16), lora_dropout=0.0, target_modules=targets, init_lora_weights="gaussian"
    )
    with warnings.catch_warnings():  # PEFT on current transformers: an API rename notice, not the demo's business
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(vla, cfg)


def train_loop(
    model,
    make_batch: Callable[[int], dict],
    steps: int,
    lr: float,
    desc: Optional[str],
    aligner=None,
    warmup: int = 10,
) -> List[Dict[str, float]]:
    """AdamW, linear warmup then cosine decay, gradients clipped at 1; an attached ``aligner`` adds its loss.
    ``desc=None`` shows no progress bar (for runs in parallel threads)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, min(warmup, steps // 2))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / max(steps, 1)))
    )
    history = []
    model.train()
    for step in tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True, disable=desc is None):
        batch = make_batch(step)
        out = model(**batch)
        loss = out.loss
        record = {"step": step, "loss": out.loss.item()}
        if aligner is not None:
            a = aligner(pixel_values=batch["pixel_values"])
            loss = loss + a.loss
            record.update({k: v.item() for k, v in a.metrics.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append(record)
    model.eval()
    return history


def pretrain_vision(vla, scenes: Sequence[Scene], n_classes: int, steps: int, lr: float, seed: int) -> List[float]:
    """Dense pretraining of the fused vision backbone (both towers) on ``scenes``: each patch token says what covers
    it and where it is. The demo's stand-in for the web-scale pretraining of DINOv2 and SigLIP."""
    backbone = vla.vision_backbone
    backbone.train()
    losses = fit_dense(
        backbone,
        backbone.parameters(),
        scenes,
        normalize_fused,
        backbone.embed_dim,
        n_classes,
        steps,
        lr,
        seed,
        "vision",
    )
    backbone.eval()
    return losses


# --- evaluation -------------------------------------------------------------------------------------------------


def object_weights(scenes: Sequence[Scene]) -> torch.Tensor:
    """(B, N): the share of each patch covered by an object (not table), for object-token pooling."""
    shares = [patch_targets((s.cover > 0).astype(np.int64), 2)[..., 1].reshape(-1) for s in scenes]
    return torch.from_numpy(np.stack(shares))


def pool(tokens: torch.Tensor, weights: torch.Tensor) -> Dict[str, torch.Tensor]:
    """(B, N, D) tokens -> {"mean": all tokens averaged (as the paper's probe), "object": the object's tokens}."""
    w = weights / weights.sum(1, keepdim=True).clamp_min(1e-6)
    return {"mean": tokens.mean(1), "object": torch.einsum("bn,bnd->bd", w, tokens)}


@torch.no_grad()
def pooled_features(
    model,
    batcher: Batcher,
    scenes: Sequence[Scene],
    layer: int,
    batch_size: int = 64,
    after_forward: Optional[Callable[[torch.Tensor], None]] = None,
):
    """Pooled visual tokens of LLM layer ``layer`` (the linear probe's input), both poolings. ``after_forward`` is
    called with each chunk's pixel values after its forward (attached aligners read the same pass)."""
    feats = []
    with VisualTokenHook(model, (layer,)) as hook:
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            batch = batcher.action(chunk, with_answer=False)
            batch.pop("labels")
            model(**batch)
            feats.append(pool(hook.pop()[layer].float(), object_weights(chunk)))
            if after_forward is not None:
                after_forward(batch["pixel_values"])
    return {k: torch.cat([f[k] for f in feats]) for k in feats[0]}


@torch.no_grad()
def teacher_features(teacher, scenes: Sequence[Scene], batch_size: int = 64):
    """Pooled teacher patch features, both poolings."""
    feats = [
        pool(teacher(images(scenes[i : i + batch_size])), object_weights(scenes[i : i + batch_size]))
        for i in range(0, len(scenes), batch_size)
    ]
    return {k: torch.cat([f[k] for f in feats]) for k in feats[0]}


def predict_xy(model, batcher: Batcher, scenes: Sequence[Scene], batch_size: int = 64) -> np.ndarray:
    """The first two action dims (x, y) of each scene's greedy action: OpenVLA's action decoder (restricted to the
    256 action tokens, as ``predict_action`` effectively is after un-normalisation) on the demo's prompt rows."""
    loaded = LoadedVLA(model=model, tokenizer=batcher.tok, image_size=0, path="demo")  # pixels are made here
    decoder = ActionDecoder(loaded, n_tokens=2, vocab_size=batcher.act.vocab_size)
    row = batcher.prompt_ids(ACTION_PROMPT)
    out = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        tokens = decoder.decode([row] * len(chunk), normalize_fused(images(chunk)))
        out.append(batcher.act.decode(tokens))
    return np.concatenate(out)


@torch.no_grad()
def vl_accuracy(model, batcher: Batcher, scenes: Sequence[Scene], kinds: Sequence[str], batch_size: int = 64) -> float:
    """Share of VL questions (the base VLA's pretraining task) answered exactly: with the answer fed in, the greedy
    token at every answer position, EOS included, is the right one. What the VLM knew, asked again after the robot
    task, as the paper's VL-Think asks its VLM questions."""
    right = []
    for start in range(0, len(scenes), batch_size):
        batch = batcher.vl(scenes[start : start + batch_size], kinds[start : start + batch_size])
        labels = batch.pop("labels")
        logits = model(**batch).logits
        n_vis = logits.shape[1] - labels.shape[1]
        pred = logits[:, n_vis:-1].argmax(-1)  # predicts input_ids[1:]: text token t sits at n_vis + t
        target = labels[:, 1:]
        scored = target != -100
        right += ((pred == target) | ~scored).all(1).tolist()
    return float(np.mean(right))


def sort_accuracy(model, batcher: Batcher, scenes: Sequence[Scene]) -> float:
    """Share of scenes whose greedy action puts the object in its bin (both axes right)."""
    xy = predict_xy(model, batcher, scenes)
    return float(np.mean([sorted_right(p, s.target) for p, s in zip(xy, scenes)]))


@torch.no_grad()
def attention_rows(model, batcher: Batcher, scenes: Sequence[Scene], layer: int) -> np.ndarray:
    """(n, h, w): attention of the prompt's last token over the visual grid at decoder block ``layer``, heads
    averaged (the paper's attention figures, at the demo's scale)."""
    batch = batcher.action(scenes, with_answer=False)
    batch.pop("labels")
    out = model(**batch, output_attentions=True)
    att = out.attentions[layer - 1].float().mean(1)[:, -1]  # (n, S): last query row
    n_vis = att.shape[-1] - batch["input_ids"].shape[1]
    side = int(round(n_vis**0.5))
    return att[:, 1 : 1 + n_vis].reshape(-1, side, side).numpy()
