"""Decoding a loaded VLA: next-token logits over right-padded token rows (where OpenVLA's logits sit once the visual
tokens are inserted after BOS) and batched greedy answers built on them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checkpoint import LoadedVLA


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def next_token_logits(loaded: LoadedVLA, seqs: Sequence[Sequence[int]], pixel_values: torch.Tensor) -> torch.Tensor:
    """One multimodal forward over the right-padded token rows ``seqs`` (BOS included); returns each row's
    next-token logits ``(len(seqs), vocab)``, read at its last real token. The model inserts visual tokens after
    BOS, so text position ``j`` is logits position ``j + (logits length - padded text length)``."""
    ids, mask = loaded.pad(seqs)
    width = ids.shape[1]
    out = loaded.model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, use_cache=False)
    logits = _logits(out)
    offset = logits.shape[1] - width  # visual tokens inserted after BOS (0 for a text-only forward)
    last = torch.tensor([len(s) - 1 + offset for s in seqs], device=logits.device)
    return logits[torch.arange(len(seqs), device=logits.device), last]


@torch.no_grad()
def greedy_decode(
    loaded: LoadedVLA,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    max_new_tokens: int = 12,
) -> List[List[int]]:
    """Greedy continuation token ids for each (prompt, image), batched; see :func:`greedy_answer`.

    A row stops after emitting EOS (kept as its last id) or a token whose text completes a newline (kept too),
    or after ``max_new_tokens`` ids."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    tok = loaded.tokenizer
    batch = loaded.batch(prompts, images)
    pixel_values = batch["pixel_values"]
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = [batch["input_ids"][i, : int(n)].tolist() for i, n in enumerate(lengths)]
    eos = tok.eos_token_id
    generated: List[List[int]] = [[] for _ in rows]
    active = list(range(len(rows)))
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        for _ in range(max_new_tokens):
            if not active:
                break
            index = torch.as_tensor(active, device=pixel_values.device)
            logits = next_token_logits(loaded, [rows[i] + generated[i] for i in active], pixel_values[index])
            next_ids = logits.argmax(-1).tolist()
            still = []
            for i, t in zip(active, next_ids):
                generated[i].append(int(t))
                done = (eos is not None and t == eos) or "\n" in tok.decode(generated[i], skip_special_tokens=True)
                if not done:
                    still.append(i)
            active = still
    finally:
        loaded.model.train(was_training)
    return generated


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """Text of generated ids: special tokens dropped, cut at the first newline, stripped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).split("\n", 1)[0].strip()


def greedy_answer(
    loaded: LoadedVLA,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    max_new_tokens: int = 12,
) -> List[str]:
    """Greedy answers to a batch of (prompt, image) pairs, WITHOUT ``.generate`` or a KV cache.

    Each step runs the ordinary multimodal forward on the whole right-padded batch of growing sequences, reads
    each row's logits at its last real token (shifted by the visual tokens the model inserts after BOS), appends
    the argmax, and drops rows that emitted EOS or a newline. This works for any model with OpenVLA's forward
    (real OpenVLA, whose ``generate`` only supports batch size 1; PEFT-wrapped models; the tiny test model, which
    has no ``generate``) and gives the same tokens as decoding one sequence at a time.

    Cost trade-off: without a cache every step recomputes the vision backbone and the full prompt (~256 visual +
    ~30 text tokens for OpenVLA-7B), so an answer of ``T`` tokens costs about ``T`` full forwards instead of one
    forward plus ``T`` single-token steps. VL-Think answers are a few tokens ("yes, left" + EOS) and finished
    rows leave the batch, so in practice this is a few forwards per batch -- and the batching (which cached
    OpenVLA generation cannot do) more than pays for it. Keep ``max_new_tokens`` small."""
    ids = greedy_decode(loaded, prompts, images, max_new_tokens=max_new_tokens)
    return [decode_answer(loaded.tokenizer, g) for g in ids]


class RowsHead(nn.Module):
    """An LLM's output head that computes logits only where they are read: at one position per row of a
    multi-token forward (``select(last, width)``: each row's last real text token, found behind the visual tokens the
    model inserts after BOS) and only for the vocabulary ids ``[lo, hi)``.

    Installed in place of ``lm_head`` (:meth:`installed`), it turns the prefill's logits from (B, L, vocab) into
    (B, 1, hi - lo): OpenVLA-7B's full-vocabulary logits at every prompt position of a batch of 64 are
    64 x ~290 x 32064 floats (2.4 GB in fp32). A plain ``nn.Linear`` head is sliced to its ``[lo, hi)`` rows; any
    other head (a LoRA-wrapped one) runs whole on the selected positions and is sliced after."""

    def __init__(self, head: nn.Module, lo: int, hi: int):
        super().__init__()
        self.head, self.lo, self.hi = head, lo, hi
        self.last: Optional[torch.Tensor] = None
        self.width = 0
        self.offset: Optional[int] = None

    def select(self, last: Optional[torch.Tensor], width: int = 0) -> None:
        """Rows' last real text positions (``None``: every position, as for single-token cached steps)."""
        self.last, self.width, self.offset = last, width, None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.last is not None and hidden.shape[1] > 1:
            self.offset = hidden.shape[1] - self.width  # visual tokens inserted after BOS
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            hidden = hidden[rows, self.last + self.offset][:, None]
        if type(self.head) is nn.Linear:
            bias = self.head.bias[self.lo : self.hi] if self.head.bias is not None else None
            return F.linear(hidden, self.head.weight[self.lo : self.hi], bias)
        return self.head(hidden)[..., self.lo : self.hi]

    @contextmanager
    def installed(self, lm: nn.Module):
        """``lm.lm_head`` is this head inside the block, the original again after it (also on errors)."""
        original = lm.lm_head
        lm.lm_head = self
        try:
            yield self
        finally:
            lm.lm_head = original


def _layers(cache):
    """Per-layer (keys, values) of a prefill's cache: legacy tuples, transformers 5's layers or 4.x's lists."""
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v in cache]
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return None


def preallocated_cache(lm: nn.Module, cache, extra: int):
    """The prefill's key/value ``cache`` copied once into buffers with room for ``extra`` more tokens, which the
    decode steps then fill in place; ``None`` for a transformers release this was not built and tested for (the
    growing cache is kept there).

    transformers' ``DynamicCache`` grows by concatenation: every decode step copies every layer's whole cache (67 %
    of a step's time at batch 64 at the bench's CPU scale). With these buffers a step writes one position. Steps must
    pass ``cache_position`` (the buffer index) and a 2-D attention mask over the whole buffer (zeros where nothing is
    written yet); the returned object is updated in place (transformers 4.40 returns no cache from a static one)."""
    import transformers

    kv = _layers(cache)
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    if not kv:
        return None
    if version >= (5, 0):
        from transformers import StaticCache

        static = StaticCache(config=lm.config, max_cache_len=kv[0][0].shape[-2] + extra)
        for i, (k, v) in enumerate(kv):
            static.update(k, v, i)
        return static
    if (4, 40) <= version < (4, 41):  # OpenVLA's pin: its StaticCache holds one buffer for all layers
        return _per_layer_static_cache(kv, extra)
    return None


def _per_layer_static_cache(kv, extra: int):
    """transformers 4.40's ``StaticCache`` contract (``LlamaModel`` passes an instance through untouched and the
    attention calls ``update(keys, values, layer_idx, {"cache_position": ...})``) with one buffer per layer."""
    from transformers.cache_utils import Cache, StaticCache

    class PerLayerStaticCache(StaticCache):
        def __init__(self, kv, extra: int):
            Cache.__init__(self)
            self.length = kv[0][0].shape[-2]
            self.max_cache_len = self.length + extra
            self.keys, self.values = [], []
            for k, v in kv:
                for source, buffers in ((k, self.keys), (v, self.values)):
                    buffer = source.new_zeros((*source.shape[:2], self.max_cache_len, source.shape[-1]))
                    buffer[:, :, : self.length] = source
                    buffers.append(buffer)

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            position = cache_kwargs["cache_position"]
            self.keys[layer_idx][:, :, position] = key_states
            self.values[layer_idx][:, :, position] = value_states
            return self.keys[layer_idx], self.values[layer_idx]

        def get_seq_length(self, layer_idx=0):
            return self.length

        def get_max_length(self):
            return self.max_cache_len

        def to_legacy_cache(self):
            return None

    return PerLayerStaticCache(kv, extra)
