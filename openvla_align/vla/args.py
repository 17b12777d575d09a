"""The model arguments of every command that takes a VLA, and the VLA they name, loaded.

One spelling on every command: ``--model DIR`` or ``DIR::ADAPTER`` (or ``--adapter ADAPTER``), ``--device``,
``--dtype`` and, for the diagnostics, ``--num-images``/``--images`` (multi-camera models such as OpenVLA-OFT)::

    MODEL = ModelArgs()      # the command module's spelling
    MODEL.add(parser)        # in its add_parser
    vla = MODEL.load(args)   # in its command, once the cheap checks have passed

What differs between commands is a field, never a copy: ``flag`` (eval run names its model ``--vla-path``), ``many``
(a repeatable flag that compares models: ``models(args)`` lists them), ``cameras``, the ``--dtype`` default, the
attention implementation, and ``others`` (values of the flag that are not VLAs, which ``--adapter`` never joins).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .. import dtypes
from ..argtypes import need_model_dir, positive_int
from .checkpoint import IMAGE_CHOICES, CameraView, LoadedVLA, load_vla, parse_model, resolve_device_dtype

__all__ = ["ModelArgs"]


@dataclass(frozen=True)
class ModelArgs:
    """How one command takes its model: which options it adds (``add``) and how it reads them back."""

    flag: str = "--model"  # the model's option
    many: bool = False  # repeatable (and optional), to compare models: read with models(args)
    cameras: bool = True  # add --num-images/--images
    dtype: Optional[str] = None  # --dtype's default; None: bfloat16 on CUDA, float32 elsewhere
    attn_implementation: Optional[str] = "eager"  # eager keeps attention weights; None: the checkpoint's own
    help: Optional[str] = None  # the flag's help; None: an OpenVLA checkpoint directory
    metavar: str = "DIR[::ADAPTER]"
    others: Tuple[str, ...] = ()  # prefixes of flag values that name no VLA (probe linear's teacher:NAME)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add(self, p: argparse.ArgumentParser) -> None:
        """The model options, on ``p``."""
        what = "OpenVLA checkpoint directory (base or merged)"
        p.add_argument(
            self.flag,
            required=not self.many,
            action="append" if self.many else "store",
            metavar=self.metavar,
            help=self.help or (f"{what}; repeat to compare models" if self.many else what),
        )
        on = f"the single {'VLA ' if self.others else ''}{self.flag}" if self.many else f"top of {self.flag}"
        p.add_argument(
            "--adapter", default=None, metavar="DIR", help=f"PEFT LoRA adapter directory on {on} (or DIR::ADAPTER)"
        )
        p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        p.add_argument(
            "--dtype",
            default=self.dtype,
            choices=dtypes.CHOICES,
            help="dtype of the VLA" if self.dtype else "default: bfloat16 on CUDA, float32 on CPU",
        )
        if self.cameras:
            p.add_argument(
                "--num-images",
                type=positive_int,
                default=None,
                metavar="N",
                help="OpenVLA-OFT: the cameras the model was trained with (its --num_images_in_input; OFT checkpoints "
                "do not record it); each image is shown to every camera (default: the model as it loads, 1 camera)",
            )
            p.add_argument(
                "--images",
                choices=IMAGE_CHOICES,
                default="all",
                help="visual tokens of every camera (default) or of the first, third-person camera only",
            )

    def models(self, args: argparse.Namespace) -> List[str]:
        """Every value of the repeatable flag, in order, with ``--adapter`` joined to the single VLA among them
        (``DIR::ADAPTER``); each VLA's spelling checked, nothing read from disk."""
        models = list(getattr(args, self.dest) or [])
        vlas = [i for i, m in enumerate(models) if not m.startswith(self.others)]
        if args.adapter:
            if len(vlas) != 1:
                raise ValueError(
                    f"--adapter {args.adapter} with {len(vlas)} VLA {self.flag}: write each model as DIR::ADAPTER "
                    "instead."
                )
            models[vlas[0]] = "::".join(parse_model(models[vlas[0]], args.adapter, self.flag))
        for i in vlas:
            parse_model(models[i], flag=self.flag)
        return models

    def spec(self, args: argparse.Namespace) -> Tuple[str, Optional[str]]:
        """(DIR, ADAPTER or None) of the single model, checked to be a checkpoint directory (and the adapter a PEFT
        adapter's) without loading anything."""
        path, adapter = parse_model(getattr(args, self.dest), args.adapter, self.flag)
        need_model_dir(path, adapter, self.flag, "--adapter")
        return path, adapter

    def device_dtype(self, args: argparse.Namespace) -> Tuple[str, str]:
        """(device, dtype) the options ask for, defaults resolved: CUDA when available; see ``dtype``."""
        return resolve_device_dtype(args.device, args.dtype)

    def view(self, args: argparse.Namespace) -> CameraView:
        """The camera view ``--num-images``/``--images`` ask for (every model's plain one without ``cameras``)."""
        return CameraView(args.num_images, args.images) if self.cameras else CameraView()

    def options(self, args: argparse.Namespace) -> Dict[str, Any]:
        """The options as the keyword arguments of an entry point that loads its models itself (probe linear's
        ``run_linear_probe``, probe vlthink's ``run``): ``device``, ``dtype`` and, with ``cameras``, ``view``."""
        device, dtype = self.device_dtype(args)
        return dict(device=device, dtype=dtype, **({"view": self.view(args)} if self.cameras else {}))

    def load(self, args: argparse.Namespace, *, device: Optional[str] = None) -> LoadedVLA:
        """The single model, loaded as the options say; ``device`` overrides ``--device`` (eval run: a rank's GPU)."""
        path, adapter = self.spec(args)
        asked, dtype = self.device_dtype(args)
        return load_vla(
            path,
            adapter,
            device=device or asked,
            dtype=dtype,
            attn_implementation=self.attn_implementation,
            num_images=self.view(args).num_images,
        )
