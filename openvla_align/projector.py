"""Projectors from the LLM width d to the teacher width d_t, with seeded, device-independent initialisation.

The MLP is the paper's "Ln&D": LayerNorm -> Linear(d, h) -> SiLU -> Linear(h, h) -> SiLU -> Linear(h, d_t).
Its ``nn.Sequential`` indices match the reference implementation's projector (``net.0``, ``net.1``, ``net.4``,
``net.7``), so its saved weights import without renaming. Weights are drawn on the CPU from a generator seeded
with ``seed``, so every process of a DDP job builds bit-identical projectors without communicating.
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, Iterable, Type

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


class CosineLinear(nn.Linear):
    """Cosine projector: L2-normalised inputs times unit-norm weight rows; each output is a cosine in [-1, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = nn.functional.normalize(self.weight, dim=1)
        return nn.functional.linear(nn.functional.normalize(x, dim=-1), w)


class CosineProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(CosineLinear(in_dim, out_dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FiLM(nn.Module):
    """Feature-wise modulation of each token, conditioned on the image's mean token: (1 + gamma) * h + beta."""

    def __init__(self, dim: int):
        super().__init__()
        self.cond = nn.Linear(dim, 2 * dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.cond(h.mean(dim=-2, keepdim=True)).chunk(2, dim=-1)
        return (1 + gamma) * h + beta


class FiLMProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), FiLM(in_dim), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Standardize(nn.Module):
    """Per-channel whitening over the batch's tokens (zero mean, unit variance; diagonal, so it scales to 4096)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        mean = flat.mean(0)
        std = flat.std(0, unbiased=False).clamp_min(1e-5)
        return (x - mean) / std


class WhiteningAffineProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(Standardize(), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpatialForcingProjector(nn.Module):
    """Spatial Forcing's align projector: [LayerNorm(d)] -> Linear(d, d_t) -> GELU -> Linear(d_t, d_t), trainable
    in its run (d_t = 2 x VGGT's 1024 = the teacher width; its hidden width is the output width). Xavier-uniform
    weights and zero biases, drawn from the seeded generator. Indices: ``net.0`` the norm (an Identity without),
    ``net.1`` fc1, ``net.3`` fc2 (the fork's ``vlm_norm``, ``fc1``, ``fc2``)."""

    def __init__(self, in_dim: int, out_dim: int, norm: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim) if norm else nn.Identity(),  # 0
            nn.Linear(in_dim, out_dim),  # 1
            nn.GELU(),  # 2
            nn.Linear(out_dim, out_dim),  # 3
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _xavier_(linear: nn.Linear, gen: torch.Generator) -> None:
    bound = math.sqrt(6.0 / (linear.in_features + linear.out_features))
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=gen)
        if linear.bias is not None:
            linear.bias.zero_()


def _orthogonal_(linear: nn.Linear, gen: torch.Generator) -> None:
    """(Semi-)orthogonal weight from the QR of a seeded Gaussian (rows or columns orthonormal)."""
    rows, cols = linear.weight.shape
    a = torch.randn(max(rows, cols), min(rows, cols), generator=gen)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # unique decomposition: same seed, same matrix everywhere
    with torch.no_grad():
        linear.weight.copy_(q if rows >= cols else q.T)


# The module behind each name `AlignConfig.projector` accepts (`config.PROJECTORS`, the one list of names);
# orthogonal and spectral are linear maps with a constraint added after initialisation.
PROJECTOR_CLASSES: Dict[str, Type[nn.Module]] = {
    "mlp": MLPProjector,
    "linear": LinearProjector,
    "cosine": CosineProjector,
    "orthogonal": LinearProjector,
    "spectral": LinearProjector,
    "film": FiLMProjector,
    "whitening": WhiteningAffineProjector,
    "spatial-forcing": SpatialForcingProjector,
    "spatial-forcing-nonorm": SpatialForcingProjector,
}


def check_kind(kind: str) -> None:
    """A clear error for a projector name nothing registered (``PROJECTOR_CLASSES``)."""
    if kind not in PROJECTOR_CLASSES:
        raise ValueError(f"Unknown projector {kind!r}; known: {', '.join(PROJECTOR_CLASSES)}.")


def build_projector(
    kind: str, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, seed: int = 0, frozen: bool = True
) -> nn.Module:
    """A projector with deterministic weights; frozen means requires_grad=False and eval mode (no dropout).

    Kinds (the paper's projector ablation, Table 6): ``mlp`` (Ln&D, default), ``linear``, ``cosine`` (normalised
    inputs and weight rows), ``orthogonal`` (semi-orthogonal weight; kept orthogonal while training),
    ``spectral`` (spectral-normalised linear), ``film`` (LayerNorm, FiLM conditioned on the mean token, linear),
    ``whitening`` (per-channel whitening over the batch's tokens, then an affine map); ``spatial-forcing`` (Spatial
    Forcing's LayerNorm -> Linear -> GELU -> Linear, hidden width = output width, xavier init) and
    ``spatial-forcing-nonorm`` (the same without the LayerNorm)."""
    check_kind(kind)
    if kind == "mlp":
        proj: nn.Module = MLPProjector(in_dim, out_dim, hidden_dim)
    elif kind.startswith("spatial-forcing"):
        proj = SpatialForcingProjector(in_dim, out_dim, norm=kind == "spatial-forcing")
    else:
        proj = PROJECTOR_CLASSES[kind](in_dim, out_dim)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    init_linear = _xavier_ if isinstance(proj, SpatialForcingProjector) else _init_linear
    for module in proj.modules():
        if isinstance(module, nn.Linear):
            init_linear(module, gen)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if isinstance(proj, FiLMProjector):  # start as the identity modulation
        nn.init.zeros_(proj.net[1].cond.weight)
        nn.init.zeros_(proj.net[1].cond.bias)
    if kind == "orthogonal":
        _orthogonal_(proj.net[0], gen)
        if not frozen:
            with torch.random.fork_rng(devices=[]):  # registering completes the basis from the global RNG
                torch.manual_seed(seed)
                nn.utils.parametrizations.orthogonal(proj.net[0])
    elif kind == "spectral":
        nn.utils.parametrizations.spectral_norm(proj.net[0])
        sn = proj.net[0].parametrizations.weight[0]
        with torch.no_grad():  # the power-iteration vectors come from the global RNG; draw them from ours
            sn._u.copy_(nn.functional.normalize(torch.randn(sn._u.shape, generator=gen), dim=0))
            sn._v.copy_(nn.functional.normalize(torch.randn(sn._v.shape, generator=gen), dim=0))
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
