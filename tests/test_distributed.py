"""Two gloo processes must build bit-identical projectors and compute identical losses on identical data."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _init(rank, world, out_dir):
    # A FileStore rendezvous: no TCP store server whose owner (rank 0) may exit while rank 1 still tears down, and
    # no free-port race with other tests (a rare SIGABRT at teardown was seen in CI with the TCP store).
    store = os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _finish(rank, world, out_dir):
    """Tear the group down only once every rank is past its last collective. gloo's barrier can return on one rank
    while the other is still reading its last message; a rank that destroyed its group (closing its sockets) then
    aborted the other one now and then under load (SIGABRT, "terminate called without an active exception": 1 run in
    15 with the other core busy). So the ranks meet once more through a FileStore, which no socket of the group
    serves, and only then destroy the group."""
    done = dist.FileStore(os.path.join(out_dir, "done"), world)
    done.set(f"rank{rank}", "done")
    done.wait([f"rank{r}" for r in range(world)], timedelta(seconds=300))
    dist.destroy_process_group()


def _worker(rank, world, out_dir):
    _init(rank, world, out_dir)
    try:
        torch.manual_seed(1000 + rank)  # different global RNG state on each rank must not matter
        from openvla_align import AlignConfig, Aligner
        from openvla_align.tiny import build_tiny_vla, build_tokenizer

        from conftest import PatchTeacher, make_batch

        tok = build_tokenizer()
        vla = build_tiny_vla(seed=0, vocab_size=len(tok), llm_layers=18)
        aligner = Aligner(AlignConfig(enabled=True, projector_dim=64), PatchTeacher()).attach(vla)
        batch = make_batch(tok, 2, seed=5)
        with torch.no_grad():
            vla(**batch)
            loss = aligner(pixel_values=batch["pixel_values"]).loss
        fp = aligner.fingerprint()
        aligner.remove()

        # One LoRA step through DDP, the aligner hooked through both wrappers; each rank sees its own half batch.
        from peft import LoraConfig, get_peft_model
        from torch.nn.parallel import DistributedDataParallel as DDP

        torch.manual_seed(0)
        peft_vla = get_peft_model(
            vla, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="gaussian")
        )
        ddp = DDP(peft_vla, find_unused_parameters=True)
        aligner.attach(ddp)
        half = {k: v[rank : rank + 1] for k, v in make_batch(tok, 2, seed=6).items()}
        out = ddp(**half)
        (out.loss + aligner(pixel_values=half["pixel_values"]).loss).backward()
        grad = next(p.grad for n, p in peft_vla.named_parameters() if "layers.3." in n and "lora_B" in n)
        gathered = [None] * world
        dist.all_gather_object(gathered, (fp, loss.item(), grad.sum().item()))
        torch.save(gathered, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        _finish(rank, world, out_dir)


def test_two_ranks_identical(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "rank0.pt")
    (fp0, loss0, g0), (fp1, loss1, g1) = results
    assert fp0 == fp1 and len(fp0) == 64
    assert loss0 == loss1
    assert g0 == g1 and g0 != 0  # DDP averaged the alignment gradient of block 4 across both ranks


def _mismatch_worker(rank, world, out_dir):
    _init(rank, world, out_dir)
    try:
        from openvla_align import AlignConfig
        from openvla_align.openvla.plugins import AlignPlugin
        from openvla_align.tiny import build_tiny_vla, build_tokenizer

        from conftest import PatchTeacher

        vla = build_tiny_vla(seed=0, vocab_size=len(build_tokenizer()))
        # A misconfigured job: rank 1 runs with another projector seed.
        plugin = AlignPlugin(AlignConfig(enabled=True, projector_dim=16, projector_seed=rank), PatchTeacher())
        try:
            plugin.on_model_ready(vla)
            message = "no error"
        except RuntimeError as exc:
            message = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)
        dist.barrier()
    finally:
        _finish(rank, world, out_dir)


def test_plugin_refuses_ranks_with_different_projectors(tmp_path):
    mp.spawn(_mismatch_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert "Alignment projectors differ across ranks" in (tmp_path / f"rank{rank}.txt").read_text()
