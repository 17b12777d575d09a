"""One target-source interface: a live teacher, a cache or any object with name/width/grid/targets feeds the Aligner
through the same path."""

import pytest
import torch

from openvla_align import AlignConfig, Aligner
from openvla_align.targets import FixedTargets, LiveTeacher, as_source
from openvla_align.vla.pixels import rgb_from_pixel_values


class RecordedTargets:
    """A third-party source: targets computed elsewhere, keyed by nothing but the batch it is given."""

    name = "recorded targets"
    grid = (16, 16)

    def __init__(self, teacher):
        self.teacher_fn, self.width, self.calls = teacher, teacher.width, 0

    def targets(self, pixel_values):
        self.calls += 1
        with torch.no_grad():
            return self.teacher_fn(rgb_from_pixel_values(pixel_values))


def test_as_source_accepts_teachers_sources_and_widths(teacher):
    assert isinstance(as_source(teacher), LiveTeacher) and as_source(teacher).width == teacher.width
    fixed = as_source(target_width=40, target_grid=(8, 8))
    assert isinstance(fixed, FixedTargets) and (fixed.width, fixed.grid) == (40, (8, 8))
    with pytest.raises(RuntimeError, match="pass precomputed `targets`"):
        fixed.targets(torch.zeros(1, 6, 224, 224))
    with pytest.raises(TypeError, match=r"is not a target source: it lacks \['name', 'width', 'grid', 'targets'\]"):
        as_source(object())
    with pytest.raises(ValueError, match="not both"):
        as_source(teacher, target_width=40)
    assert as_source() is None


def test_any_source_gives_the_live_teachers_loss(vla, batch, teacher):
    cfg = AlignConfig(enabled=True, layers=(8,), projector_dim=32)
    live = Aligner(cfg, teacher).attach(vla)
    with torch.no_grad():
        vla(**batch)
        expect = live(pixel_values=batch["pixel_values"]).loss.item()
    live.remove()
    source = RecordedTargets(teacher)
    other = Aligner(cfg, source).attach(vla)
    assert other.teacher is None and other.teacher_width == teacher.width
    with torch.no_grad():
        vla(**batch)
        assert other(pixel_values=batch["pixel_values"]).loss.item() == pytest.approx(expect, abs=1e-6)
    assert source.calls == 1
    other.remove()
