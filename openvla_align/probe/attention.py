"""Where does a text token look in the image? Attention of prompt token(s) over the 16x16 visual grid, per layer.

The paper's attention figures show how SFT "blinds" the VLA: middle LLM layers stop attending to the object named
in the instruction. This probe reproduces them for any checkpoint (and adapter): one forward with
``output_attentions=True`` and, for each chosen layer, the attention row of the query token(s) restricted to the
visual positions, heads averaged (or kept), reshaped to the patch grid and drawn over the image.

Sequence layout inside OpenVLA: position 0 is BOS, positions 1..N are the N = 16x16 visual tokens (row-major patch
grid), then prompt tokens 1.. follow, so prompt token i >= 1 sits at sequence position i + N. Layer L means decoder
block L (1-based), i.e. ``attentions[L - 1]``, the block whose output is ``output_hidden_states[L]`` - the same
numbering as the aligner's layers.

Attention weights only exist with eager attention; SDPA/flash kernels never materialise them, so a model loaded
that way is refused with instructions rather than silently producing nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from PIL import Image

from .._io import atomic_write_bytes, save_figure
from ..vla.args import ModelArgs
from ..vla.checkpoint import LoadedVLA, load_image, token_spans, vqa_prompt
from ..vla.layout import check_layers

LAST = "last"
_LAYER_ITEM = re.compile(r"(-?\d+)(?:\s*-\s*(-?\d+))?")
MODEL = ModelArgs(attn_implementation="eager")  # attention weights exist only with eager attention


class AttentionWeightsUnavailable(RuntimeError):
    """The model runs an attention kernel (SDPA/flash) that does not return attention weights."""


# --- arguments -------------------------------------------------------------------------------------------------


def parse_layers(spec: Union[str, int, Sequence[int]]) -> List[int]:
    """``"14-24"`` (inclusive), ``"14,16,20"``, ``"16"``, mixes like ``"1-3,8"``, an int or a list of ints.

    Order is kept and repeats are dropped, so the figure's columns follow what the user typed.
    Range checking against the model happens later (it needs the model's depth).
    """
    if isinstance(spec, int):
        items: List[int] = [spec]
    elif isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            m = _LAYER_ITEM.fullmatch(part)
            if m is None:
                raise ValueError(
                    f"Cannot read layers {spec!r}: {part!r} is not an integer or a range. "
                    "Use e.g. '14-24', '14,16,20' or '16'."
                )
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise ValueError(f"Layer range {part!r} runs backwards; write it as {hi}-{lo}.")
            items.extend(range(lo, hi + 1))
    else:
        items = [int(x) for x in spec]
    out: List[int] = []
    for layer in items:
        if layer not in out:
            out.append(layer)
    if not out:
        raise ValueError(f"No layers given in {spec!r}; use e.g. '14-24', '14,16,20' or '16'.")
    return out


def layers_arg(text: str) -> List[int]:
    """argparse ``type=``: the same parser, with its message shown as a usage error."""
    try:
        return parse_layers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def query_positions(tokenizer, prompt: str, tokens: str = LAST) -> List[int]:
    """Positions in the tokenised prompt (BOS = 0) of the query token(s): the last token, or a word's tokens."""
    ids = tokenizer(prompt).input_ids
    if tokens == LAST:
        if len(ids) < 2:
            raise ValueError(f"The prompt {prompt!r} tokenises to {len(ids)} token(s); it has no text token to query.")
        return [len(ids) - 1]
    return token_spans(tokenizer, prompt, tokens)


# --- computation -----------------------------------------------------------------------------------------------


@dataclass
class AttentionMaps:
    """Attention of the query token(s) over the visual grid, for each requested layer.

    ``maps`` holds the raw softmax weights (not renormalised), float32 on CPU: ``(n_layers, side, side)`` with
    heads averaged, or ``(n_layers, heads, side, side)`` with ``keep_heads``. When a word spans several tokens,
    their attention rows are averaged. The ``*_mass`` tensors ``(n_layers,)`` split each (heads-averaged) row
    into BOS / visual / text shares (they sum to 1).
    """

    maps: torch.Tensor
    layers: List[int]
    prompt: str
    query_tokens: List[str]  # as the tokenizer spells them (e.g. 'Ġplate' / '▁plate')
    query_text: str  # the same tokens decoded ('plate'), for titles
    query_positions: List[int]  # in the tokenised prompt, BOS = 0
    sequence_positions: List[int]  # in the VLA's sequence, visual tokens included
    bos_mass: torch.Tensor
    visual_mass: torch.Tensor
    text_mass: torch.Tensor
    image: Image.Image  # the RGB image resized to the model's input size, as the patches see it
    model_name: str = ""
    cameras: int = 1  # images per sample the model was set to (OpenVLA-OFT), each showing `image`
    images: str = "all"  # the map: the cameras' grids summed ("all") or the first camera's ("primary")

    @property
    def keep_heads(self) -> bool:
        return self.maps.dim() == 4

    def layer_maps(self) -> torch.Tensor:
        """(n_layers, side, side), heads averaged whatever ``keep_heads`` was."""
        return self.maps.mean(1) if self.keep_heads else self.maps

    def summary(self) -> Dict:
        """Per-layer numbers for the JSON: attention mass on BOS/visual/text, and how spread the visual part is.

        ``entropy`` is the Shannon entropy (nats) of the visual attention renormalised to sum to 1;
        ``entropy_normalized`` divides it by log(N), so 1.0 means uniform over all patches and values near 0 mean
        the token looks at one patch. ``peak`` is the (row, col) of the strongest patch.
        """
        maps = self.layer_maps()
        side = maps.shape[-1]
        per_layer = {}
        for i, layer in enumerate(self.layers):
            flat = maps[i].flatten().double()
            p = flat / flat.sum().clamp_min(1e-30)
            entropy = max(float(-(p * p.clamp_min(1e-30).log()).sum()), 0.0)  # no "-0.0" for a one-hot map
            peak = int(flat.argmax())
            entry = {
                "visual_mass": float(self.visual_mass[i]),
                "bos_mass": float(self.bos_mass[i]),
                "text_mass": float(self.text_mass[i]),
                "entropy": entropy,
                "entropy_normalized": entropy / math.log(flat.numel()),
                "peak": [peak // side, peak % side],
            }
            if self.keep_heads:
                entry["heads_visual_mass"] = [float(h.sum()) for h in self.maps[i]]
            per_layer[str(layer)] = entry
        return {
            "model": self.model_name,
            "prompt": self.prompt,
            "query_tokens": self.query_tokens,
            "query_text": self.query_text,
            "query_positions": self.query_positions,
            "sequence_positions": self.sequence_positions,
            "grid": [side, side],
            "cameras": {"num_images": self.cameras, "map": self.images},
            "heads": "kept" if self.keep_heads else "averaged",
            "layers": per_layer,
        }


def _attentions_or_raise(out, impl_hint: str):
    attns = getattr(out, "attentions", None)
    # Depending on the transformers version, SDPA either returns None per layer or an empty tuple.
    if not attns or any(a is None for a in attns):
        raise AttentionWeightsUnavailable(
            f"The model returned no attention weights (attention implementation: {impl_hint}). Only eager "
            "attention materialises them: load the model with attn_implementation='eager' "
            "(load_vla(..., attn_implementation='eager'), the CLI's default)."
        )
    return attns


@torch.no_grad()
def attention_maps(
    vla: LoadedVLA,
    image: Union[str, Path, Image.Image],
    prompt: str,
    layers: Union[str, int, Sequence[int]],
    tokens: str = LAST,
    keep_heads: bool = False,
    images: str = "all",
) -> AttentionMaps:
    """Attention of ``tokens`` (``"last"`` prompt token, or the tokens of a word) over the visual grid.

    ``prompt`` is used as given (wrap a question with ``vqa_prompt`` first for OpenVLA's format). A model set to
    N cameras (OpenVLA-OFT) sees the image in every camera; its map is the first camera's grid (``images="primary"``)
    or the sum of the N cameras' grids (``"all"``); the visual mass always counts every camera's tokens.
    """
    layers = parse_layers(layers)
    impl = vla.attn_implementation()
    if impl != "eager":
        raise AttentionWeightsUnavailable(
            f"The model was loaded with attn_implementation={impl!r}, which does not return attention weights. "
            "Reload it with attn_implementation='eager' (load_vla(..., attn_implementation='eager'), the CLI's "
            "default) to draw attention maps."
        )
    check_layers(vla.model, layers)
    if not isinstance(image, Image.Image):
        image = load_image(image)
    image = image.convert("RGB")
    positions = query_positions(vla.tokenizer, prompt, tokens)
    batch = vla.batch([prompt], [image])
    n_text = batch["input_ids"].shape[1]
    out = vla.model(**batch, output_attentions=True)
    attns = _attentions_or_raise(out, impl)

    # The number of visual tokens is whatever the projector inserted: sequence length minus prompt length.
    seq_len = attns[0].shape[-1]
    n_vis = seq_len - n_text
    cameras = max(vla.num_images, 1)
    side = math.isqrt(max(n_vis // cameras, 0))
    if n_vis <= 0 or cameras * side * side != n_vis:
        raise ValueError(
            f"Expected {cameras} square grid(s) of visual tokens after BOS, but the sequence has {seq_len} positions "
            f"for {n_text} prompt tokens ({n_vis} extra). Is this an OpenVLA-style model?"
        )
    seq_pos = [p + n_vis if p > 0 else 0 for p in positions]

    maps, bos, vis, txt = [], [], [], []
    for layer in layers:
        a = attns[layer - 1][0].float()  # (heads, S, S)
        rows = a[:, seq_pos, :].mean(1)  # (heads, S): averaged over the word's tokens
        visual = rows[:, 1 : 1 + n_vis].reshape(rows.shape[0], cameras, side, side)
        visual = visual[:, 0] if images == "primary" else visual.sum(1)
        maps.append(visual if keep_heads else visual.mean(0))
        mean_row = rows.mean(0)
        bos.append(mean_row[0])
        vis.append(mean_row[1 : 1 + n_vis].sum())
        txt.append(mean_row[1 + n_vis :].sum())
    del out, attns

    ids = batch["input_ids"][0].tolist()
    return AttentionMaps(
        maps=torch.stack(maps).cpu(),
        layers=layers,
        prompt=prompt,
        query_tokens=vla.tokenizer.convert_ids_to_tokens([ids[p] for p in positions]),
        query_text=vla.tokenizer.decode([ids[p] for p in positions]).strip(),
        query_positions=positions,
        sequence_positions=seq_pos,
        bos_mass=torch.stack(bos).cpu(),
        visual_mass=torch.stack(vis).cpu(),
        text_mass=torch.stack(txt).cpu(),
        image=image.resize((vla.image_size, vla.image_size), Image.BILINEAR),
        model_name=vla.name,
        cameras=cameras,
        images=images,
    )


# --- rendering -------------------------------------------------------------------------------------------------


SCALES = ("max", "minmax")


def save_attention_grid(
    result: AttentionMaps,
    path: Union[str, Path],
    *,
    title: Optional[str] = None,
    scale: str = "max",
    cmap: str = "jet",
    alpha: float = 0.5,
    dpi: int = 110,
) -> Path:
    """One PNG: a column per layer (titled with the layer and the query's attention mass on visual tokens), one row
    (heads averaged) or one row per head.

    Each panel is scaled on its own: ``scale="max"`` maps 0..max to the colour range, so near-uniform attention
    looks uniform; ``"minmax"`` stretches min..max, which shows any pattern at all but also amplifies noise.
    Compare layers' strength by the titles' numbers, not by colour.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: choose one of {SCALES}.")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("Drawing attention maps needs matplotlib: pip install matplotlib") from None
    import textwrap

    import numpy as np

    grid = result.maps.numpy()
    if not result.keep_heads:
        grid = grid[:, None]
    n_layers, n_rows, side, _ = grid.shape
    panel = 1.9 if n_rows == 1 else 1.4
    width = max(panel * n_layers + 0.6, 4.0)
    # Figure() rather than pyplot: no global backend switch, so this works headless and inside notebooks alike.
    fig = Figure(figsize=(width, panel * n_rows + 1.2))
    axes = np.asarray(fig.subplots(n_rows, n_layers, squeeze=False))
    img = np.asarray(result.image)
    extent = (0, side, side, 0)  # patch coordinates, so each heat-map cell covers the patch it was read from
    for c, layer in enumerate(result.layers):
        for r in range(n_rows):
            ax = axes[r, c]
            m = grid[c, r].astype(np.float64)
            lo = float(m.min()) if scale == "minmax" else 0.0
            m = (m - lo) / max(float(m.max()) - lo, 1e-30)
            ax.imshow(img, extent=extent)
            ax.imshow(m, extent=extent, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"layer {layer}\nvisual mass {float(result.visual_mass[c]):.2f}", fontsize=8)
            if result.keep_heads:
                ax.set_ylabel(f"head {r}", fontsize=7)
    text = (
        f"{title or result.model_name}: attention of {result.query_text!r} "
        f"({'per head' if result.keep_heads else 'heads averaged'}, each panel scaled to its "
        f"{'min..max' if scale == 'minmax' else 'max'}) | prompt: {result.prompt!r}"
    )
    fig.suptitle(textwrap.fill(text, width=int(width * 15)), fontsize=8)
    return save_figure(fig, path, dpi)


def write_summary(result: AttentionMaps, path: Union[str, Path]) -> Path:
    path = Path(path)
    atomic_write_bytes(path, json.dumps(result.summary(), indent=2).encode())
    return path


def format_table(result: AttentionMaps) -> str:
    lines = [f"{'layer':>5}  {'visual':>7}  {'BOS':>7}  {'text':>7}  {'entropy/log N':>13}  peak (row, col)"]
    for layer, s in result.summary()["layers"].items():
        lines.append(
            f"{layer:>5}  {s['visual_mass']:7.3f}  {s['bos_mass']:7.3f}  {s['text_mass']:7.3f}  "
            f"{s['entropy_normalized']:13.3f}  ({s['peak'][0]}, {s['peak'][1]})"
        )
    return "\n".join(lines)


# --- CLI -------------------------------------------------------------------------------------------------------


def _cmd_attention(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out} should be a .png path (the JSON summary is written next to it).")
    image = load_image(args.image)  # fail on a bad image before spending time loading the model
    prompt = args.prompt if args.raw_prompt else vqa_prompt(args.prompt)
    vla = MODEL.load(args)
    result = attention_maps(
        vla, image, prompt, args.layers, tokens=args.tokens, keep_heads=args.keep_heads, images=args.images
    )
    png = save_attention_grid(result, out, scale=args.scale)
    js = write_summary(result, out.with_suffix(".json"))
    print(
        f"query {result.query_text!r} = token(s) {result.query_tokens} at prompt position(s) {result.query_positions}"
    )
    print(format_table(result))
    print(f"wrote {png} and {js}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("attention", description=__doc__)
    MODEL.add(p)
    p.add_argument("--image", required=True, help="image file (any format PIL reads)")
    p.add_argument(
        "--prompt",
        required=True,
        help="instruction or question; wrapped as OpenVLA's 'In: ...\\nOut:' unless --raw-prompt",
    )
    p.add_argument("--raw-prompt", action="store_true", help="use --prompt exactly as given (no 'In: ...\\nOut:')")
    p.add_argument(
        "--layers",
        type=layers_arg,
        default=parse_layers("14-24"),
        help="decoder layers (1-based): '14-24', '14,16,20' or '16' (default 14-24)",
    )
    p.add_argument(
        "--tokens",
        default=LAST,
        help="'last' (default): the last prompt token; or a word of the prompt (its last occurrence; "
        "the attention of its tokens is averaged)",
    )
    p.add_argument("--keep-heads", action="store_true", help="one row per attention head instead of their mean")
    p.add_argument(
        "--scale",
        choices=SCALES,
        default="max",
        help="colour scale per panel: 'max' (0..max, default; uniform looks uniform) or 'minmax'",
    )
    p.add_argument("--out", required=True, help="output PNG; a JSON summary goes next to it (same name, .json)")
    p.set_defaults(func=_cmd_attention)
    return p
