"""A small generated image-instruction-action dataset with OpenVLA's batch layout.

Each scene is a table-coloured background with one coloured object (square, circle or triangle) and a white
plate. The instruction names the object; the 7-D action moves from the object towards the plate (x, y) at a
fixed small z, no rotation and a closed gripper, so only x and y must be read from the pixels. The object's shape
and colour are held-out labels for linear probing: they are not in the action, only in the pixels (and the
instruction's wording).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

from ..shapes import shape_mask
from ..vla.actions import ActionTokenizer
from ..vla.checkpoint import IGNORE_INDEX, action_prompt
from ..vla.pixels import normalize_fused

SHAPES = ("square", "circle", "triangle")
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.85, 0.1)}


@dataclass
class Scenes:
    images: torch.Tensor  # (M, 3, H, W) in [0, 1]
    instructions: List[str]
    actions: np.ndarray  # (M, 7) in [-1, 1]
    shape_label: np.ndarray  # (M,) index into SHAPES
    color_label: np.ndarray  # (M,) index into COLORS


def _draw(rng: np.random.Generator, size: int):
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(0.3, 0.6, 3)  # table colour
    yy, xx = np.mgrid[0:size, 0:size]
    plate = rng.uniform(0.2, 0.8, 2) * size
    r_plate = size * 0.12
    img[(yy - plate[1]) ** 2 + (xx - plate[0]) ** 2 <= r_plate**2] = 0.95
    shape = int(rng.integers(len(SHAPES)))
    color_name = list(COLORS)[int(rng.integers(len(COLORS)))]
    obj = rng.uniform(0.15, 0.85, 2) * size
    half = size * rng.uniform(0.07, 0.11)
    img[shape_mask(SHAPES[shape], xx - obj[0], yy - obj[1], half)] = COLORS[color_name]
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    delta = (plate - obj) / size  # in [-0.65, 0.65]
    action = np.array([delta[0] * 1.5, delta[1] * 1.5, -0.1, 0.0, 0.0, 0.0, 1.0])
    instruction = f"put the {color_name} {SHAPES[shape]} on the plate"
    return np.clip(img, 0, 1), instruction, np.clip(action, -1, 1), shape, list(COLORS).index(color_name)


def generate_scenes(n: int, seed: int = 0, size: int = 224) -> Scenes:
    rng = np.random.default_rng(seed)
    imgs, instr, acts, shapes, colors = [], [], [], [], []
    for _ in range(n):
        img, text, action, shape, color = _draw(rng, size)
        imgs.append(torch.from_numpy(img).permute(2, 0, 1))
        instr.append(text)
        acts.append(action)
        shapes.append(shape)
        colors.append(color)
    return Scenes(torch.stack(imgs), instr, np.stack(acts).astype(np.float32), np.array(shapes), np.array(colors))


def collate(
    scenes: Scenes, index: np.ndarray, tokenizer, action_tokenizer: ActionTokenizer, pad_to: int = 0
) -> Dict[str, torch.Tensor]:
    """OpenVLA-style batch: BOS + prompt + 7 action tokens + EOS, right-padded (to at least ``pad_to``), loss on
    action tokens + EOS."""
    prompts = [tokenizer(action_prompt(scenes.instructions[i])).input_ids for i in index]
    answers = [action_tokenizer.encode(scenes.actions[i]) for i in index]
    batch = answer_batch(prompts, answers, tokenizer, pad_to)
    return {**batch, "pixel_values": normalize_fused(scenes.images[torch.as_tensor(index)])}


def answer_batch(prompts, answers, tokenizer, pad_to: int = 0) -> Dict[str, torch.Tensor]:
    """Token rows ``prompt + answer + EOS`` right-padded (to at least ``pad_to``), labels on the answer and EOS only;
    an answer of ``None`` leaves the row as its prompt (for generation)."""
    rows, labels = [], []
    for ids, answer in zip(prompts, answers):
        tail = [] if answer is None else list(answer) + [tokenizer.eos_token_id]
        rows.append(list(ids) + tail)
        labels.append([IGNORE_INDEX] * len(ids) + tail)
    width = max(pad_to, max(len(r) for r in rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, (ids, lbl) in enumerate(zip(rows, labels)):
        input_ids[j, : len(ids)] = torch.tensor(ids)
        lab[j, : len(lbl)] = torch.tensor(lbl)
        mask[j, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": lab}
