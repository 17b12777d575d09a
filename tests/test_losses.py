import math

import pytest
import torch

from openvla_align.losses import cosine_loss, get_loss, l2_loss, ntxent_loss


def _pair(seed=0, b=2, n=5, d=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.randn(b, n, d, generator=g)


def test_cosine_matches_formula():
    s, t = _pair()
    sn = s / s.norm(dim=-1, keepdim=True)
    tn = t / t.norm(dim=-1, keepdim=True)
    expect = -(sn * tn).sum(-1).mean()
    loss, metrics = cosine_loss(s, t)
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(metrics["cos"], -expect)
    assert cosine_loss(t, t)[0].item() == pytest.approx(-1.0, abs=1e-6)


def test_l2_matches_definition():
    s, t = _pair(1)
    expect = sum(((s[b, i, k] - t[b, i, k]) ** 2).item() for b in range(2) for i in range(5) for k in range(7)) / 70
    assert l2_loss(s, t)[0].item() == pytest.approx(expect, rel=1e-5)


def test_ntxent_matches_definition():
    s, t = _pair(2, b=2, n=3, d=4)
    tau = 0.1
    S = [x / x.norm() for x in s.reshape(-1, 4)]
    T = [x / x.norm() for x in t.reshape(-1, 4)]
    m = len(S)

    def ce(a, bset, i):  # -log softmax over all candidates of the positive i
        logits = [float(a[i] @ bset[j]) / tau for j in range(m)]
        return -(logits[i] - math.log(sum(math.exp(v) for v in logits)))

    expect = 0.5 * (sum(ce(S, T, i) for i in range(m)) / m + sum(ce(T, S, i) for i in range(m)) / m)
    assert ntxent_loss(s, t, temperature=tau)[0].item() == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("name", ["cosine", "l2", "ntxent"])
def test_mismatched_shapes_are_refused(name):
    with pytest.raises(ValueError, match=r"token grids \(N\) or widths \(D\) do not match"):
        get_loss(name)(torch.randn(1, 4, 8), torch.randn(1, 4, 9))


def test_unknown_loss():
    with pytest.raises(ValueError, match="Unknown alignment loss 'kl'; known: cosine, one-minus-cosine, l2, ntxent"):
        get_loss("kl")
