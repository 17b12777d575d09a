"""Capture the visual-token hidden states of chosen LLM layers with removable forward hooks.

Layer L means ``output_hidden_states[L]``: the output of decoder block L-1 (index 0 is the embedding output,
which is not a block and cannot be aligned). For L equal to the number of blocks, HF models return the
*final-normed* state, so the hook sits on the final norm there. Visual tokens are positions 1 .. 1+N after BOS,
with N read from the VLA projector's output on every forward. Nothing asks for ``output_hidden_states``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .vla.layout import NotAnOpenVLAModel, check_layers, describe, layer_output_module, unwrap


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class VisualTokenHook:
    """Forward hooks that keep only the visual-token slice of the chosen layers for the current step.

    ``pop()`` hands the captured tensors over and forgets them, so nothing outlives the step that made it.
    ``target="encoder"`` captures the vision backbone's output instead (Enc2Enc). ``only_with_grad=True`` ignores
    forwards run without autograd (a training loop's validation, OpenVLA-OFT's diffusion sampling), so they neither
    cost memory nor replace what the training forward captured.
    """

    def __init__(
        self, vla: nn.Module, layers: Sequence[int] = (16,), target: str = "backbone", only_with_grad: bool = False
    ):
        self.vla = vla
        self.layers = tuple(layers)
        self.target = target
        self.only_with_grad = only_with_grad
        base = unwrap(vla)
        for name in ("vision_backbone", "projector", "language_model"):
            if not isinstance(getattr(base, name, None), nn.Module):
                raise NotAnOpenVLAModel(
                    f"Expected an OpenVLA-style model with `{name}`, got {describe(base)}; openvla-align hooks "
                    "OpenVLAForActionPrediction or models with its module layout."
                )
        if target == "backbone":
            self.num_blocks = check_layers(vla, self.layers)
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._num_visual: Optional[int] = None
        self._captured: Dict[int, torch.Tensor] = {}

    # --- lifecycle ---
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "VisualTokenHook":
        if self.attached:
            return self
        base = unwrap(self.vla)
        if self.target == "encoder":
            self._handles.append(base.vision_backbone.register_forward_hook(self._capture_encoder))
            return self
        self._handles.append(base.projector.register_forward_hook(self._record_num_visual))
        for layer in self.layers:
            module = layer_output_module(self.vla, layer)
            self._handles.append(module.register_forward_hook(self._make_capture(layer)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "VisualTokenHook":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- data ---
    def pop(self) -> Dict[int, torch.Tensor]:
        """Captured (B, N, d) slices keyed by layer (key 0 for the encoder target); clears the store."""
        out, self._captured = self._captured, {}
        return out

    def clear(self) -> None:
        self._captured = {}
        self._num_visual = None

    # --- hook bodies ---
    def _skip(self) -> bool:
        return self.only_with_grad and not torch.is_grad_enabled()

    def _record_num_visual(self, module, args, output) -> None:
        if not self._skip():
            self._num_visual = _first(output).shape[1]

    def _capture_encoder(self, module, args, output) -> None:
        if not self._skip():
            self._captured[0] = _first(output)

    def _make_capture(self, layer: int):
        def capture(module, args, output) -> None:
            if self._num_visual is None or self._skip():
                return  # a text-only or cached-generation forward (no visual tokens), or one without autograd
            hidden = _first(output)
            # A view, not a copy: it keeps the block's output alive until `pop()`, which autograd does anyway (the
            # next block's input is saved for backward). Only the hooked layers are kept, never all of them.
            self._captured[layer] = hidden[:, 1 : 1 + self._num_visual]

        return capture
