"""VGGT's aggregator (Meta, facebook/VGGT-1B) in plain PyTorch, written from the architecture; no VGGT code.

Only the aggregator is needed for feature alignment: VGGT's camera, depth, point and track heads read its outputs and
are never built here. Parameter names follow VGGT's checkpoint (the keys under ``aggregator.`` in its ``model.pt``),
so that checkpoint loads strictly. What the network computes, in order:

1. normalisation: [0, 1] RGB of every frame is standardised with the ImageNet mean/std (the model does this itself);
2. patch embedding: a DINOv2 ViT with register tokens (ViT-L/14 with 4 registers for VGGT-1B): a 14x14 stride-14
   convolution, a class token, a learnt position embedding for an ``img_size`` square (37x37 patches at 518 px;
   other grids resample it bicubically with antialiasing, class entry untouched), the registers inserted after the
   class token without position, pre-norm blocks with LayerScale (LayerNorm eps 1e-6), a final LayerNorm; only the
   normalised patch tokens go on;
3. prefix tokens: per frame one camera token and ``num_register_tokens`` register tokens are put in front of the
   patch tokens (so patch tokens start at ``patch_start_idx = 1 + num_register_tokens``). Each kind has two learnt
   versions: the first frame of a sequence gets version 0, every later frame version 1;
4. ``depth`` pairs of pre-norm blocks (LayerNorm eps 1e-5, LayerScale, GELU MLP) whose attention normalises queries
   and keys per head (LayerNorm over the head dimension) and rotates them with a 2D rotary embedding: a frame block
   attends within each frame, the global block after it attends over all tokens of all frames of a sample;
5. layer ``i``'s feature is the concatenation, on channels, of frame block ``i``'s output and global block ``i``'s
   output: (B, S, P, 2 * embed_dim), prefix tokens included.

The 2D rotary embedding: each head's channels are split in two halves, the first rotated by the token's row, the
second by its column. Within a half of ``m`` channels, channel ``j`` and channel ``j + m/2`` form a pair rotated by
the angle ``position * rope_freq ** (-2j / m)``. Patch tokens have positions (row + 1, column + 1), counted from 0;
prefix tokens sit at (0, 0). Every frame uses the same positions, in the global blocks too (no frame index).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .radio_vit import _FeedForward, _LayerScale  # the same layers as RADIO's ViT (state-dict names fc1/fc2, gamma)
from .spec import IMAGENET_MEAN, IMAGENET_STD

# VGGT-1B's aggregator.
VGGT_EMBED_DIM = 1024
VGGT_DEPTH = 24
VGGT_NUM_HEADS = 16
VGGT_PATCH_SIZE = 14
VGGT_IMG_SIZE = 518  # its input size: the patch embedding's position grid is 37x37
VGGT_NUM_REGISTER_TOKENS = 4
VGGT_ROPE_FREQ = 100.0

_AGG_EPS = 1e-5  # the alternating blocks' LayerNorms (torch's default)
_VIT_EPS = 1e-6  # the DINOv2 patch embedding's LayerNorms


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the 2D rotary embedding to (..., N, head_dim) with (N, head_dim) tables; computed in float32."""
    x = t.float()
    a, b, c, d = x.chunk(4, dim=-1)  # row half = (a, b), column half = (c, d); pairs are (a_j, b_j) and (c_j, d_j)
    turned = torch.cat((-b, a, -d, c), dim=-1)
    return (x * cos + turned * sin).to(t.dtype)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"VGGT width {dim} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, heads, n, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, qk_norm: bool, ls_init: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, num_heads, qk_norm, eps)
        self.ls1 = _LayerScale(dim, ls_init)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _FeedForward(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim, ls_init)

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchConv(nn.Module):
    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)


class DinoPatchEmbed(nn.Module):
    """The DINOv2 ViT (with registers) VGGT uses as its patch embedding: normalised images (N, 3, H, W) in, its
    final-normed patch tokens (N, (H/p) * (W/p), D) out (class and register tokens dropped)."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        patch_size: int = VGGT_PATCH_SIZE,
        img_size: int = VGGT_IMG_SIZE,
        num_register_tokens: int = VGGT_NUM_REGISTER_TOKENS,
    ):
        super().__init__()
        self.patch_size = int(patch_size)
        self.pos_grid = int(img_size) // self.patch_size
        self.num_register_tokens = int(num_register_tokens)
        self.patch_embed = _PatchConv(embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.pos_grid**2, embed_dim) * 0.02)
        self.register_tokens = (
            nn.Parameter(torch.randn(1, num_register_tokens, embed_dim) * 0.02) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # kept for the checkpoint's keys; never used
        self.blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, mlp_ratio, _VIT_EPS, qk_norm=False, ls_init=1.0) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=_VIT_EPS)

    def position_embedding(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """(1, 1 + rows * cols, D): the class entry, then the patch grid resampled to rows x cols (bicubic,
        antialiased, sizes given explicitly) unless it is the stored grid."""
        g = self.pos_grid
        if (rows, cols) == (g, g):
            return self.pos_embed
        table = self.pos_embed.float()
        grid = table[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat((table[:, :1], grid), dim=1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        rows, cols = h // self.patch_size, w // self.patch_size
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat((self.cls_token.expand(n, -1, -1), t), dim=1)
        t = t + self.position_embedding(rows, cols, t.dtype)
        if self.register_tokens is not None:
            t = torch.cat((t[:, :1], self.register_tokens.expand(n, -1, -1), t[:, 1:]), dim=1)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)[:, 1 + self.num_register_tokens :]


def _first_and_rest(tokens: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """(1, 2, k, D) learnt tokens -> (b * s, k, D): version 0 for each sample's first frame, version 1 for the rest."""
    per_frame = torch.cat((tokens[:, :1], tokens[:, 1:2].expand(1, s - 1, -1, -1)), dim=1)  # (1, s, k, D)
    return per_frame.expand(b, -1, -1, -1).reshape(b * s, *tokens.shape[2:])


class VGGTAggregator(nn.Module):
    """VGGT's aggregator: images (B, S, 3, H, W) in [0, 1] -> one layer's features (B, S, P, 2 * embed_dim), the
    ``patch_start_idx`` prefix tokens first. Defaults are VGGT-1B. The patch embedding's width is ``embed_dim`` (its
    tokens join the camera and register tokens without a projection); its depth and heads default to the
    aggregator's (24 and 16 both, in VGGT-1B), so ``embed_dim``/``depth``/``num_heads`` alone give a whole reduced
    model. See the module docstring."""

    def __init__(
        self,
        embed_dim: int = VGGT_EMBED_DIM,
        depth: int = VGGT_DEPTH,
        num_heads: int = VGGT_NUM_HEADS,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = VGGT_NUM_REGISTER_TOKENS,
        patch_size: int = VGGT_PATCH_SIZE,
        img_size: int = VGGT_IMG_SIZE,
        patch_embed_depth: Optional[int] = None,
        patch_embed_num_heads: Optional[int] = None,
        patch_embed_mlp_ratio: float = 4.0,
        rope_freq: float = VGGT_ROPE_FREQ,
    ):
        super().__init__()
        head_dim = embed_dim // num_heads
        if embed_dim % num_heads or head_dim % 4:
            raise ValueError(
                f"VGGT: embed_dim={embed_dim} / num_heads={num_heads} must give a head size divisible by 4 (the 2D "
                "rotary embedding rotates channel pairs in a row half and a column half)."
            )
        self.embed_dim = int(embed_dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.patch_size = int(patch_size)
        self.img_size = int(img_size)
        self.num_register_tokens = int(num_register_tokens)
        self.patch_start_idx = 1 + self.num_register_tokens
        self.rope_freq = float(rope_freq)

        self.patch_embed = DinoPatchEmbed(
            embed_dim,
            depth if patch_embed_depth is None else patch_embed_depth,
            num_heads if patch_embed_num_heads is None else patch_embed_num_heads,
            mlp_ratio=patch_embed_mlp_ratio,
            patch_size=patch_size,
            img_size=img_size,
            num_register_tokens=num_register_tokens,
        )
        self.frame_blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, mlp_ratio, _AGG_EPS, qk_norm=True, ls_init=0.01) for _ in range(depth)
        )
        self.global_blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, mlp_ratio, _AGG_EPS, qk_norm=True, ls_init=0.01) for _ in range(depth)
        )
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, embed_dim) * 0.02)
        self.register_token = nn.Parameter(torch.randn(1, 2, num_register_tokens, embed_dim) * 0.02)

    def layer_index(self, layer: int) -> int:
        """``layer`` (negative counts from the end, -1 = last) as an index in [0, depth)."""
        if not -self.depth <= int(layer) < self.depth:
            raise ValueError(
                f"VGGT has {self.depth} layers; layer={layer} is out of range [-{self.depth}, {self.depth})."
            )
        return int(layer) % self.depth

    def rope_tables(self, rows: int, cols: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (patch_start_idx + rows * cols, head_dim) float32, for one frame's tokens."""
        half = (self.embed_dim // self.num_heads) // 2
        inv_freq = 1.0 / (self.rope_freq ** (torch.arange(0, half, 2, device=device).float() / half))
        ys = torch.arange(1, rows + 1, device=device).repeat_interleave(cols)
        xs = torch.arange(1, cols + 1, device=device).repeat(rows)
        prefix = torch.zeros(self.patch_start_idx, dtype=ys.dtype, device=device)
        ys, xs = torch.cat((prefix, ys)), torch.cat((prefix, xs))
        ang_y = ys.float()[:, None] * inv_freq[None]
        ang_x = xs.float()[:, None] * inv_freq[None]
        angles = torch.cat((ang_y, ang_y, ang_x, ang_x), dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """(B, S, 3, H, W) in [0, 1] -> layer ``layer``'s (B, S, P, 2 * embed_dim); only blocks up to it are run."""
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"VGGT takes (B, S, 3, H, W) RGB in [0, 1]; got {tuple(images.shape)}.")
        b, s, _, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"VGGT input {h}x{w} is not a multiple of the patch size {p}.")
        last = self.layer_index(layer)
        dtype = self.camera_token.dtype
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 1, 3, 1, 1)
        x = ((images.float() - mean) / std).to(dtype).reshape(b * s, 3, h, w)

        patches = self.patch_embed(x)
        prefix = torch.cat(
            (_first_and_rest(self.camera_token, b, s), _first_and_rest(self.register_token, b, s)), dim=1
        )
        tokens = torch.cat((prefix.to(patches.dtype), patches), dim=1)
        n, d = tokens.shape[1:]
        cos, sin = self.rope_tables(h // p, w // p, images.device)
        frame_rope = (cos, sin)
        global_rope = (cos.repeat(s, 1), sin.repeat(s, 1))  # every frame has the same positions

        for i in range(last + 1):
            tokens = self.frame_blocks[i](tokens.reshape(b * s, n, d), frame_rope)
            frame_out = tokens
            tokens = self.global_blocks[i](tokens.reshape(b, s * n, d), global_rope)
        return torch.cat((frame_out.reshape(b, s, n, d), tokens.reshape(b, s, n, d)), dim=-1)
