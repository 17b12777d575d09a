"""Two gloo processes must build bit-identical projectors and compute identical losses on identical data."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(1000 + rank)  # different global RNG state on each rank must not matter
        from conftest import PatchTeacher, make_batch
        from openvla_align import AlignConfig, Aligner
        from openvla_align.testing import build_tiny_vla, build_tokenizer

        tok = build_tokenizer()
        vla = build_tiny_vla(seed=0, vocab_size=len(tok), llm_layers=18)
        aligner = Aligner(AlignConfig(enabled=True, projector_dim=64), PatchTeacher()).attach(vla)
        batch = make_batch(tok, 2, seed=5)
        with torch.no_grad():
            vla(**batch)
            loss = aligner(pixel_values=batch["pixel_values"]).loss
        fp = aligner.fingerprint()
        gathered = [None] * world
        dist.all_gather_object(gathered, (fp, loss.item()))
        torch.save(gathered, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "rank0.pt")
    (fp0, loss0), (fp1, loss1) = results
    assert fp0 == fp1 and len(fp0) == 64
    assert loss0 == loss1
