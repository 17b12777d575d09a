"""What the linear probe (and its cache) reads: a VLA checkpoint's layer-L visual tokens or a teacher's patch
features, mean-pooled, extracted in batches with images read ahead."""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..vla.checkpoint import CameraView, load_image, load_vla, parse_model, release_memory, vqa_prompt

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = vqa_prompt("What is in the image?")


@dataclass(frozen=True)
class ModelSpec:
    """A VLA checkpoint (optionally with a LoRA adapter) or a registered teacher."""

    path: Optional[str] = None
    adapter: Optional[str] = None
    teacher: Optional[str] = None
    teacher_path: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``DIR``, ``DIR::ADAPTER_DIR``, ``teacher:NAME`` or ``teacher:NAME::WEIGHTS``."""
        if text.startswith("teacher:"):
            name, _, weights = text[len("teacher:") :].partition("::")
            if not name:
                raise ValueError(
                    f"--model {text!r} names no teacher; write teacher:NAME, e.g. teacher:c-radio-v3-l "
                    "(`openvla-align teachers` lists them)."
                )
            return cls(teacher=name, teacher_path=weights or None)
        path, adapter = parse_model(text)
        return cls(path=path, adapter=adapter)

    @property
    def is_teacher(self) -> bool:
        return self.teacher is not None

    @property
    def label(self) -> str:
        if self.is_teacher:
            return f"teacher:{self.teacher}" + (f"::{self.teacher_path}" if self.teacher_path else "")
        return self.path + (f"::{self.adapter}" if self.adapter else "")


def as_model_spec(model: Union[str, ModelSpec]) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else ModelSpec.parse(str(model))


def _layer_error(layer: int, n: int, name: str) -> ValueError:
    return ValueError(
        f"--layer {layer} is out of range for {name}: its LLM has {n} decoder blocks, so layers run from 1 to {n} "
        "(layer L = output_hidden_states[L]; the paper probes 16 of 32)."
    )


class _StopForward(Exception):
    """Raised by a hook once the probed layer has run: the layers above it and the LM head are not needed."""


def _stop(module, args, output):
    raise _StopForward


class _VLAEncoder:
    """PIL images -> (B, d) mean visual-token hidden states at one LLM layer."""

    def __init__(self, spec: ModelSpec, layer: int, prompt: str, device: str, dtype: str, view: CameraView):
        from ..vla.layout import decoder_layers, layer_output_module

        self.view = view
        self.vla = load_vla(
            spec.path, spec.adapter, device=device, dtype=dtype, attn_implementation=None, num_images=view.num_images
        )
        n = len(decoder_layers(self.vla.model))
        if not 1 <= layer <= n:
            raise _layer_error(layer, n, spec.label)
        self.layer, self.prompt = layer, prompt
        self._last = layer_output_module(self.vla.model, layer)  # where the capture hook sits: stop right after it

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        from ..hooks import VisualTokenHook

        batch = self.vla.batch([self.prompt] * len(images), images)
        with VisualTokenHook(self.vla.model, (self.layer,)) as hook:
            handle = self._last.register_forward_hook(_stop)  # after the capture hook, so it runs second
            try:
                self.vla.model(**batch)
            except _StopForward:
                pass
            finally:
                handle.remove()
            hidden = self.vla.select_images(hook.pop()[self.layer], self.view.images)
        return hidden.float().mean(1).cpu()


class _TeacherEncoder:
    """PIL images -> (B, D) mean final patch features of a registered teacher (a multi-view teacher sees each image
    as a sample of one camera)."""

    def __init__(self, spec: ModelSpec, device: str, dtype: str, teacher_kwargs: Mapping[str, Any]):
        from .. import dtypes
        from ..teachers.build import build_teacher

        kwargs = dict(teacher_kwargs)
        if spec.teacher_path:
            kwargs["path"] = spec.teacher_path
        # seeded: random-weight smoke-test teachers must give the same features on every run
        self.teacher = build_teacher(spec.teacher, device=device, dtype=dtypes.canonical(dtype), seed=0, **kwargs)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        side = self.teacher.resolution
        rgb = [np.asarray(im.convert("RGB").resize((side, side), Image.BILINEAR)) for im in images]
        x = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float().div(255.0)
        if self.teacher.multi_view:  # each image is a one-camera sample
            x = x[:, None]
        return self.teacher(x.to(self.device)).float().mean(1).cpu()


class _LazyEncoder:
    """Builds the model on first use, so a run served from the cache never loads it."""

    def __init__(self, build: Callable[[], Callable]):
        self._build, self._encode = build, None

    def build(self) -> "_LazyEncoder":
        """Load the model now (before a progress bar starts, so a load error is the only thing printed)."""
        if self._encode is None:
            self._encode = self._build()
        return self

    def __call__(self, images):
        return self.build()._encode(images)

    def close(self) -> None:
        if self._encode is not None:
            self._encode = None
            release_memory()


def make_encoder(
    spec: ModelSpec, layer: int, prompt: str, device: str, dtype: str, teacher_kwargs, view: Optional[CameraView] = None
) -> _LazyEncoder:
    if spec.is_teacher:
        return _LazyEncoder(lambda: _TeacherEncoder(spec, device, dtype, teacher_kwargs or {}))
    return _LazyEncoder(lambda: _VLAEncoder(spec, layer, prompt, device, dtype, view or CameraView()))


def _prefetched(paths: Sequence[Path], batch_size: int, workers: int) -> Iterator[List[Image.Image]]:
    """Batches of decoded images; up to two batches are decoded ahead on threads (PIL releases the GIL)."""
    pending: deque = deque()
    todo = iter(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def fill():
            while len(pending) < 2 * batch_size:
                path = next(todo, None)
                if path is None:
                    return
                pending.append(pool.submit(load_image, path))

        fill()
        while pending:
            batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            fill()
            yield batch


def extract_features(
    model: Union[str, ModelSpec],
    paths: Sequence[Union[str, Path]],
    *,
    layer: int = 16,
    prompt: str = DEFAULT_PROMPT,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 16,
    workers: int = 4,
    teacher_kwargs: Optional[Mapping[str, Any]] = None,
    encoder: Optional[Callable[[List[Image.Image]], torch.Tensor]] = None,
    desc: str = "features",
    view: Optional[CameraView] = None,
) -> np.ndarray:
    """(N, D) float32 mean-pooled features of ``paths`` (see the module docstring), in order.

    ``encoder`` reuses an already built model across calls (``run_linear_probe`` does for train and val).
    ``view``: the cameras of a multi-camera model (OpenVLA-OFT) and which of their visual tokens are pooled.
    """
    if batch_size < 1:
        raise ValueError(f"Extraction batch size must be >= 1, got {batch_size}.")
    spec = as_model_spec(model)
    encode = encoder or make_encoder(spec, layer, prompt, device, dtype, teacher_kwargs, view)
    if isinstance(encode, _LazyEncoder):
        encode.build()
    out: Optional[np.ndarray] = None
    done = 0
    with tqdm(total=len(paths), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for images in _prefetched([Path(p) for p in paths], batch_size, workers):
            feats = encode(images).numpy()
            if not np.isfinite(feats).all():
                raise FloatingPointError(
                    f"{spec.label} produced NaN/inf features (dtype {dtype}); float16 overflows in large models, "
                    "so use --dtype bfloat16 or float32."
                )
            if out is None:
                out = np.empty((len(paths), feats.shape[1]), dtype=np.float32)
            out[done : done + len(feats)] = feats
            done += len(feats)
            bar.update(len(feats))
    if out is None:
        raise ValueError("extract_features got no image paths.")
    return out
