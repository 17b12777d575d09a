"""CPU stand-ins for the CUDA-only calls of OpenVLA's and OpenVLA-OFT's ``vla-scripts/finetune.py`` (tests only,
never the patch).

The stock scripts assert a GPU (OpenVLA), pin ``torch.cuda`` devices, autocast on ``"cuda"``, wrap modules in DDP
with ``device_ids`` (OFT: ``wrap_ddp`` for the VLA and each head/projector) and read ``accelerate.PartialState``;
:func:`install` turns each of those into its CPU equivalent inside one gloo process group (``dist.barrier`` works
there) and leaves everything else (model, data, PEFT, saving) real. :func:`main` runs a script under the shim:

    python tests/_cpu_shim.py SPEC.json          # one process (rank/world size from the spec, file rendezvous)
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_cpu_shim.py SPEC.json   # torchrun

Both scripts train in bf16. This kind of CPU has no bf16 hardware: torch's bf16 GEMM runs at ~1 GFLOP/s here, 60x
below fp32, and a 4-step run of the tiny model took minutes. :class:`Bf16GemmInFp32` (on unless the spec says
``"bf16_gemm": "native"``) runs every bf16 matrix product as a GPU's bf16 GEMM computes it -- bf16 inputs, fp32
accumulation, a bf16 result -- by upcasting the operands: the script's tensors, weights and outputs stay bf16.

SPEC holds ``script`` and ``argv``; optional ``metrics`` (a JSON file receiving every ``wandb.log`` call of rank 0),
``rank``/``world_size``/``store`` (without torchrun), ``pythonpath`` (prepended to ``sys.path``) and ``kill_at``
(``[point, occurrence]``: see :func:`kill_at`). OFT's script
reads ``./prismatic/`` relative to the working directory (it syncs the modeling files into ``--vla_path``: run it in
the checkout) and asks the Hub whether ``--vla_path`` is a repo id (set ``HF_HUB_OFFLINE=1``: it answers no at once).
"""

import contextlib
import json
import os
import sys
from pathlib import Path


def install(script: str, rank: int = 0, world_size: int = 1, store=None) -> None:
    """Patch torch/accelerate so that ``script`` trains on CPU as rank ``rank`` of ``world_size`` (gloo)."""
    import torch
    import torch.nn.parallel

    script = str(Path(script).resolve())
    # "GPU available" answers only the script's own assertion; libraries keep seeing the real answer
    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: sys._getframe(1).f_code.co_filename == script or real_is_available()
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    real_autocast = torch.autocast
    torch.autocast = lambda device_type, **kw: real_autocast("cpu", **kw)

    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:  # launched by torchrun: env:// rendezvous
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
    else:
        init = f"file://{Path(store).resolve()}"
        torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)

    class CpuDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__(module, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP

    class State:  # accelerate's PartialState, as much of it as the scripts and prismatic's overwatch read
        is_main_process = rank == 0
        local_process_index = "cpu"  # the script moves tensors `.to(device_id)`
        process_index = rank
        num_processes = torch.distributed.get_world_size()

        def on_main_process(self, function):  # a decorator: run only on rank 0
            return function if rank == 0 else (lambda *args, **kwargs: None)

        on_local_main_process = on_main_process

        @contextlib.contextmanager
        def main_process_first(self):
            if rank != 0:
                torch.distributed.barrier()
            yield
            if rank == 0:
                torch.distributed.barrier()

        local_main_process_first = main_process_first

    import accelerate

    accelerate.PartialState = State


def bf16_gemm_in_fp32():
    """A dispatch mode: bf16 mm/addmm/bmm/baddbmm computed on fp32 copies of their operands, the result cast back to
    bf16 (what a GPU's bf16 GEMM does: bf16 in, fp32 accumulate, bf16 out). Every other op runs as it is."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    matmuls = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}

    class Bf16GemmInFp32(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in matmuls and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
                up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
                return func(*up, **kwargs).to(torch.bfloat16)
            return func(*args, **kwargs)

    return Bf16GemmInFp32()


def import_tensorflow_graphics() -> None:
    """Import ``tensorflow_graphics.geometry.transformation`` (upstream's ``droid_utils`` imports it with the RLDS
    configs) with a frames-only ``inspect.stack``: its ``export_api`` calls ``inspect.stack()`` once per module,
    which reads the source of every frame on the stack and scans ``sys.modules`` for each -- 40+ s per process once
    torch and transformers are loaded, under a second this way. Same module, same exported names."""
    import importlib.util
    import inspect

    if "tensorflow_graphics.geometry.transformation" in sys.modules:
        return
    try:
        if importlib.util.find_spec("tensorflow_graphics") is None:
            return
    except (ImportError, ValueError):
        return

    def frames_only(context=1):
        frame, frames = sys._getframe(1), []
        while frame is not None:
            code = frame.f_code
            frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
            frame = frame.f_back
        return frames

    real_stack, inspect.stack = inspect.stack, frames_only
    try:
        import tensorflow_graphics.geometry.transformation  # noqa: F401
    finally:
        inspect.stack = real_stack


def record_wandb(path: Path, rank: int) -> None:
    """Keep wandb real (``WANDB_MODE=disabled``) and also write every ``wandb.log`` of rank 0 to ``path``."""
    import wandb

    log, real_init = [], wandb.init

    def init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_log = wandb.log  # `wandb.init` rebinds the module's `log` to the run's

        def logged(data, step=None, **kw):
            log.append({"step": step, **{k: float(v) for k, v in data.items()}})
            if rank == 0:
                Path(path).write_text(json.dumps(log))
            return real_log(data, step=step, **kw)

        wandb.log = logged
        return run

    wandb.init = init


KILL_POINTS = ("adapter-write", "sidecar-write", "merged-write", "between-renames", "after-renames", "disk-full")


def kill_at(point: str, occurrence: int) -> None:
    """SIGKILL this process (no exception, no cleanup) the ``occurrence``-th time a checkpoint save reaches
    ``point``: ``adapter-write`` / ``sidecar-write`` / ``merged-write`` (half of the LoRA adapter's / the align
    projector's / the merged model's safetensors file written into the save's staging directory),
    ``between-renames`` (the staging directory about to be renamed into place, the previous checkpoint already moved
    aside to ``.<name>.old``), ``after-renames`` (renamed into place, ``.<name>.old`` not yet deleted). ``disk-full``
    is no kill: the adapter's write into the staging directory fails with ENOSPC after half the file, as on a full
    disk."""
    import signal

    if point not in KILL_POINTS:
        raise ValueError(f"unknown fault point {point!r}; one of {KILL_POINTS}")
    seen = [0]

    def reached() -> bool:
        seen[0] += 1
        return seen[0] == occurrence

    def die() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def staged(path) -> bool:  # inside a save's staging directory (`.<name>.tmp`)
        return any(p.name.startswith(".") and p.name.endswith(".tmp") for p in Path(path).parents)

    if point.endswith("-write") or point == "disk-full":
        import errno

        import safetensors.torch

        real_save_file = safetensors.torch.save_file
        wanted = {"sidecar-write": ("projector.",), "merged-write": ("model.", "model-")}.get(point, ("adapter_model",))

        def save_file(tensors, filename, *args, **kwargs):
            result = real_save_file(tensors, filename, *args, **kwargs)
            if Path(filename).name.lstrip(".").startswith(wanted) and staged(filename) and reached():
                with open(filename, "r+b") as f:  # the write got halfway
                    f.truncate(Path(filename).stat().st_size // 2)
                if point == "disk-full":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
                die()
            return result

        safetensors.torch.save_file = save_file
        return

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        commit = sys._getframe(1).f_code.co_name == "commit_dir" and Path(src).name.endswith(".tmp")  # staging -> final
        if commit and point == "between-renames" and reached():
            die()
        result = real_replace(src, dst, *args, **kwargs)
        if commit and point == "after-renames" and reached():
            die()
        return result

    os.replace = replace


def main() -> None:
    import runpy

    spec = json.loads(Path(sys.argv[1]).read_text())
    for entry in reversed(spec.get("pythonpath", [])):
        sys.path.insert(0, entry)
    rank = int(os.environ.get("RANK", spec.get("rank", 0)))
    import_tensorflow_graphics()
    install(spec["script"], rank, spec.get("world_size", 1), spec.get("store", sys.argv[1] + ".pg"))
    if spec.get("metrics"):
        record_wandb(Path(spec["metrics"]), rank)
    if spec.get("kill_at"):
        kill_at(*spec["kill_at"])
    import torch

    torch.manual_seed(0)
    sys.argv = [spec["script"], *spec["argv"]]
    mode = bf16_gemm_in_fp32() if spec.get("bf16_gemm", "fp32") == "fp32" else contextlib.nullcontext()
    try:
        with mode:
            runpy.run_path(spec["script"], run_name="__main__")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
