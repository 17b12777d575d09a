import torch
import torch.nn as nn

from openvla_align.projector import build_projector, fingerprint


def test_mlp_is_ln_and_dense_stack():
    proj = build_projector("mlp", 64, 24, hidden_dim=32)
    layers = [m for m in proj.net if not isinstance(m, nn.Dropout)]
    kinds = [type(m) for m in layers]
    assert kinds == [nn.LayerNorm, nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    assert (layers[1].in_features, layers[1].out_features) == (64, 32)
    assert (layers[3].in_features, layers[3].out_features) == (32, 32)
    assert (layers[5].in_features, layers[5].out_features) == (32, 24)
    # Same Sequential indices as the reference implementation's saved projector.
    assert sorted(proj.state_dict()) == sorted(f"net.{i}.{p}" for i in (0, 1, 4, 7) for p in ("weight", "bias"))


def test_seeded_init_is_deterministic_and_seed_dependent():
    a = build_projector("mlp", 64, 24, hidden_dim=32, seed=0)
    torch.manual_seed(999)  # the global RNG must not matter
    b = build_projector("mlp", 64, 24, hidden_dim=32, seed=0)
    c = build_projector("mlp", 64, 24, hidden_dim=32, seed=1)
    assert fingerprint([a]) == fingerprint([b]) != fingerprint([c])
    bound = 1 / 64**0.5
    w = a.net[1].weight
    assert w.abs().max() <= bound and w.std() > bound / 3  # PyTorch's default Linear init range


def test_frozen_means_no_grad_and_eval():
    proj = build_projector("mlp", 8, 4, hidden_dim=8, frozen=True)
    assert not proj.training and all(not p.requires_grad for p in proj.parameters())
    trainable = build_projector("mlp", 8, 4, hidden_dim=8, frozen=False)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_linear_projector():
    proj = build_projector("linear", 8, 4)
    assert proj(torch.randn(2, 3, 8)).shape == (2, 3, 4)
