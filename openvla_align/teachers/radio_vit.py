"""The C-RADIOv3 backbone in plain PyTorch (no timm, no RADIO code): what ``radio.py``'s docstring lists, step by
step. Weights and teachers are in ``radio.py``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .radio_variants import RADIO_PATCH_SIZE, RADIO_PREFIX_TOKENS
from .spec import CLIP_MEAN, CLIP_STD

PATCH_SIZE = RADIO_PATCH_SIZE
POS_GRID = 128  # RADIO's max resolution 2048 px / patch 16
NUM_PREFIX_TOKENS = RADIO_PREFIX_TOKENS
DEFAULT_ALIGN_CORNERS = False  # NVlabs/RADIO torch.hub code since 2025-06 (what the reference loads)


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"RADIO width {dim} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, heads, n, head_dim)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, layer_scale: bool, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _SelfAttention(dim, num_heads, qkv_bias)
        self.ls1 = _LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _FeedForward(dim, mlp_hidden)
        self.ls2 = _LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RadioViT(nn.Module):
    """RADIO's ViT backbone: [0,1] RGB (B, 3, H, W) in, patch tokens (B, (H/16)*(W/16), D) out.

    H and W must be multiples of the patch size; any size up to and beyond the 2048 px CPE grid works.
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_hidden_dim: Optional[int] = None,
        patch_size: int = PATCH_SIZE,
        pos_grid: int = POS_GRID,
        num_prefix_tokens: int = NUM_PREFIX_TOKENS,
        layer_scale: bool = True,
        qkv_bias: bool = True,
        patch_bias: bool = False,
        patch_norm: bool = False,
        final_norm: bool = False,
        feature_normalizer: bool = False,
        align_corners: bool = DEFAULT_ALIGN_CORNERS,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.pos_grid = int(pos_grid)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.align_corners = bool(align_corners)
        hidden = int(mlp_hidden_dim or 4 * embed_dim)
        scale = embed_dim**-0.5

        self.register_buffer("input_mean", torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1))
        self.patch_embed = nn.Linear(3 * patch_size * patch_size, embed_dim, bias=patch_bias)
        self.pos_embed = nn.Parameter(torch.randn(1, pos_grid * pos_grid, embed_dim) * scale)
        self.prefix_tokens = (
            nn.Parameter(torch.randn(num_prefix_tokens, embed_dim) * scale) if num_prefix_tokens > 0 else None
        )
        self.patch_norm = nn.LayerNorm(embed_dim) if patch_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, hidden, layer_scale, qkv_bias, eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps) if final_norm else nn.Identity()
        if feature_normalizer:
            self.register_buffer("feature_mean", torch.zeros(embed_dim))
            self.register_buffer("feature_tx", torch.eye(embed_dim))
        else:
            self.feature_mean = None
            self.feature_tx = None

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, rows*cols, C*p*p), each patch flattened channel-major, patches row-major."""
        b, c, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"RADIO input {h}x{w} is not a multiple of the patch size {p}.")
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def pos_embed_for(self, rows: int, cols: int) -> torch.Tensor:
        """Position embedding for a rows x cols patch grid, (1, rows*cols, D), as RADIO computes it at inference."""
        g = self.pos_grid
        if (rows, cols) == (g, g):
            return self.pos_embed
        grid = self.pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        side = max(rows, cols)
        grid = F.interpolate(grid.float(), size=(side, side), mode="bilinear", align_corners=self.align_corners)
        grid = grid[:, :, :rows, :cols].to(self.pos_embed.dtype)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embed.weight.dtype
        x = (images.float() - self.input_mean.float()) / self.input_std.float()
        rows, cols = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(self.patchify(x.to(dtype)))
        x = x + self.pos_embed_for(rows, cols)
        n_prefix = 0
        if self.prefix_tokens is not None:
            n_prefix = self.prefix_tokens.shape[0]
            x = torch.cat([self.prefix_tokens.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.patch_norm(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, n_prefix:]
        if self.feature_tx is not None:
            x = (x - self.feature_mean) @ self.feature_tx.T
        return x
