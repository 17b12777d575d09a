import pytest
import torch
import torch.nn as nn

from openvla_align.projector import PROJECTOR_CLASSES, build_projector, fingerprint


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


def test_an_unregistered_projector_is_refused():
    with pytest.raises(ValueError, match="Unknown projector 'mlp2'; known: mlp, linear, cosine"):
        build_projector("mlp2", 4, 4)


@pytest.mark.parametrize("kind", list(PROJECTOR_CLASSES))
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_every_projector_kind(kind, frozen, tmp_path):
    """Seeded (same bytes on every build), frozen or trainable, and saved/restored through the Aligner sidecar."""
    from openvla_align import AlignConfig, Aligner
    from openvla_align.projector import build_projector, fingerprint

    a = build_projector(kind, 24, 40, hidden_dim=16, seed=3, frozen=frozen)
    b = build_projector(kind, 24, 40, hidden_dim=16, seed=3, frozen=frozen)
    assert fingerprint([a]) == fingerprint([b]) != fingerprint([build_projector(kind, 24, 40, hidden_dim=16, seed=4)])
    x = torch.randn(2, 5, 24)
    assert a(x).shape == (2, 5, 40)
    assert any(p.requires_grad for p in a.parameters()) == (not frozen)
    if not frozen:
        opt = torch.optim.SGD(a.parameters(), lr=0.5)
        a(x).pow(2).mean().backward()
        opt.step()
        assert fingerprint([a]) != fingerprint([b])
        if kind == "orthogonal":  # stays (semi-)orthogonal while it trains
            w = a.net[0].weight
            torch.testing.assert_close(w.T @ w, torch.eye(24), atol=1e-4, rtol=0)
        if kind == "spectral":
            a.eval()
            assert torch.linalg.matrix_norm(a.net[0].weight, ord=2) <= 1.05
    if kind == "cosine":
        assert a(x).abs().max() <= 1 + 1e-5
    cfg = AlignConfig(enabled=True, projector=kind, projector_dim=16, projector_seed=3, freeze_projector=frozen)
    aligner = Aligner(cfg, target_width=40)
    aligner.projectors["16"] = a
    aligner.save(tmp_path)
    loaded = Aligner.load(tmp_path, target_width=40)
    assert fingerprint([loaded.projectors["16"]]) == fingerprint([a])
    a.eval()
    loaded.projectors["16"].eval()
    torch.testing.assert_close(loaded.projectors["16"](x), a(x))
