"""Projectors from the LLM width d to the teacher width d_t, with seeded, device-independent initialisation.

The MLP is the paper's "Ln&D": LayerNorm -> Linear(d, h) -> SiLU -> Linear(h, h) -> SiLU -> Linear(h, d_t).
Its ``nn.Sequential`` indices match the reference implementation's projector (``net.0``, ``net.1``, ``net.4``,
``net.7``), so its saved weights import without renaming. Weights are drawn on the CPU from a generator seeded
with ``seed``, so every process of a DDP job builds bit-identical projectors without communicating.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable

import torch
import torch.nn as nn


def _init_linear(linear: nn.Linear, gen: torch.Generator) -> None:
    # PyTorch's default nn.Linear init (kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the
    # weight, the same bound for the bias), drawn from our generator.
    bound = 1.0 / math.sqrt(linear.in_features)
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=gen)
        if linear.bias is not None:
            linear.bias.uniform_(-bound, bound, generator=gen)


class MLPProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim),  # 0
            nn.Linear(in_dim, hidden_dim),  # 1: (B, N, d) -> (B, N, h)
            nn.SiLU(),  # 2
            nn.Dropout(dropout),  # 3: p=0.1 as the reference; only a trainable projector in train mode drops
            nn.Linear(hidden_dim, hidden_dim),  # 4
            nn.SiLU(),  # 5
            nn.Dropout(dropout),  # 6
            nn.Linear(hidden_dim, out_dim),  # 7: (B, N, h) -> (B, N, d_t)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_projector(
    kind: str, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, seed: int = 0, frozen: bool = True
) -> nn.Module:
    """A projector with deterministic weights; frozen means requires_grad=False and eval mode (no dropout)."""
    if kind == "mlp":
        proj: nn.Module = MLPProjector(in_dim, out_dim, hidden_dim)
    elif kind == "linear":
        proj = LinearProjector(in_dim, out_dim)
    else:
        raise ValueError(f"Unknown projector {kind!r}; known: mlp, linear.")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for module in proj.modules():
        if isinstance(module, nn.Linear):
            _init_linear(module, gen)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if frozen:
        proj.requires_grad_(False)
        proj.eval()
    return proj


def fingerprint(modules: Iterable[nn.Module]) -> str:
    """SHA-256 over the exact bytes of every parameter and buffer, in name order (for cross-rank checks)."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
