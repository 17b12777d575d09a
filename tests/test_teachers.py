"""Every registered teacher, parametrised over the registry itself: shape, grid, frozen, errors."""

import re
import sys
import textwrap
import warnings

import pytest
import torch

from openvla_align import AlignConfig, Aligner
from openvla_align.teachers import (
    TeacherPluginError,
    TeacherRequest,
    TeacherWeightsNotFound,
    _registry,
    broken_plugins,
    build_teacher,
    create_teacher,
    list_teachers,
    load_plugins,
    register_teacher,
    teacher_spec,
)
from openvla_align.teachers.spec import REQUEST_FIELDS
from openvla_align.tiny import tiny_teacher
from openvla_align.tiny.model import TINY_VIT

ALL = list_teachers()


def _tiny(name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_teacher(name, **kw)


def _images(teacher, b, size=224):
    """[0,1] images the way ``teacher`` takes them: (b, 3, H, W), or one camera per sample for a multi-view one."""
    images = torch.rand(b, 3, size, size)
    return images[:, None] if teacher.multi_view else images


def test_builtin_families_are_registered():
    for name in ("c-radio-v3-b", "c-radio-v3-l", "c-radio-v3-h", "c-radio-v3-g", "dinov2-vit-l", "dinov2-vit-l-reg"):
        assert name in ALL
    assert any(n.startswith("siglip") for n in ALL) and any(n.startswith("theia") for n in ALL)
    assert list_teachers("c-radio-*") == ["c-radio-v3-b", "c-radio-v3-g", "c-radio-v3-h", "c-radio-v3-l"]
    assert teacher_spec("c-radio-v3-l").width == 1024 and teacher_spec("c-radio-v3-l").patch_size == 16


@pytest.mark.parametrize("name", ALL)
def test_teacher_contract(name):
    teacher = _tiny(name)
    images = _images(teacher, 2)
    with torch.enable_grad():
        feats = teacher(images)
    assert feats.shape == (2, 256, teacher.width)
    assert torch.isfinite(feats).all() and not feats.requires_grad
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training  # a teacher never leaves eval mode
    # deterministic: same image, same features
    torch.testing.assert_close(teacher(images), feats)


@pytest.mark.parametrize("name", ALL)
def test_grid_resampling(name):
    # Native grid 16x16 resampled to an 8x8 student grid equals resizing the feature map like an image.
    native = _tiny(name, resolution=16 * teacher_spec(name).patch_size)  # a 16x16 native grid
    small = _tiny(name, grid=(8, 8), resolution=native.resolution)  # same input size, smaller student grid
    images = _images(native, 1)
    full = native(images)
    fmap = full.transpose(1, 2).reshape(1, -1, 16, 16)
    expect = torch.nn.functional.interpolate(fmap, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(small(images), expect.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_missing_weights_offline_say_where(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(TeacherWeightsNotFound, match=r"teacher_path|Put the file"):
        create_teacher(name)


@pytest.mark.parametrize("name", ALL)
def test_random_weights_only_on_request_and_loudly(name):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        tiny_teacher(name)


def test_wrong_width_and_grid_are_refused(tokenizer):
    from openvla_align.tiny import build_tiny_vla

    vla = build_tiny_vla(vocab_size=len(tokenizer))
    teacher = _tiny("dinov2-vit-s", grid=(14, 14))
    with pytest.raises(ValueError, match=r"\(14, 14\) grid but the VLA has a \(16, 16\)"):
        Aligner(AlignConfig(enabled=True, projector_dim=16), teacher).attach(vla)
    aligner = Aligner(AlignConfig(enabled=True, projector_dim=16), _tiny("c-radio-v3-l")).attach(vla)
    with torch.no_grad():
        vla(input_ids=torch.tensor([[1, 5, 6]]), pixel_values=torch.randn(1, 6, 224, 224))
        with pytest.raises(ValueError, match="widths .* do not match"):
            aligner(targets=torch.randn(1, 256, 7))


def test_unknown_teacher_lists_known():
    with pytest.raises(ValueError, match=r"Unknown teacher 'clip-vit-l'\. Known teachers: c-radio-v3-b, .*dinov2"):
        create_teacher("clip-vit-l")


def _write_plugin(root, name, body, ep_value):
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(body))
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[openvla_align.teachers]\n{ep_value}\n")


def test_third_party_teacher_via_entry_point(tmp_path, monkeypatch):
    _write_plugin(
        tmp_path,
        "toy_teacher_pkg",
        """
        import torch.nn as nn
        from openvla_align.teachers import Teacher, TeacherSpec

        SPEC = TeacherSpec("toy", "toy", 12, 16, (0.5,) * 3, (0.5,) * 3, 0, "anywhere")

        class Toy(Teacher):
            def __init__(self, grid=(16, 16), **_):
                super().__init__(SPEC, grid=grid)
                self.conv = nn.Conv2d(3, 12, 16, 16)
                self.freeze()

            def _features(self, x):
                return self.conv(x).flatten(2).transpose(1, 2)

        def make_toy(**kw):
            return Toy(**kw)
        """,
        "toy = toy_teacher_pkg:make_toy",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        load_plugins(force=True)
        assert "toy" in list_teachers("to*")
        assert create_teacher("toy")(torch.rand(1, 3, 256, 256)).shape == (1, 256, 12)
    finally:
        _registry._REGISTRY.pop("toy", None)


def test_third_party_family_module_builds_through_the_one_signature(tmp_path, monkeypatch):
    """A family outside the package: one module (``build(spec, request, **params)``) plus one registration (its
    ``TEACHERS`` table, read when the entry point names the module)."""
    _write_plugin(
        tmp_path,
        "toy_family_pkg",
        """
        import torch.nn as nn
        from openvla_align.teachers import CatalogEntry, Teacher, TeacherSpec

        SEEN = []

        class Toy(Teacher):
            def __init__(self, spec, request, width):
                super().__init__(spec, request.resolution, request.grid)
                self.conv = nn.Conv2d(3, width, spec.patch_size, spec.patch_size)

            def _features(self, x):
                return self.conv(x).flatten(2).transpose(1, 2)

        def build(spec, request, width):
            SEEN.append(request)
            return Toy(spec, request, width).freeze()

        SPEC = TeacherSpec("toy-fam", "toy", 12, 16, (0.5,) * 3, (0.5,) * 3, 0, "anywhere")
        TEACHERS = [CatalogEntry(SPEC, __name__, {"width": 12})]
        """,
        "toyfam = toy_family_pkg",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        load_plugins(force=True)
        assert teacher_spec("toy-fam").family == "toy"
        teacher = build_teacher("toy-fam", grid=(8, 8), arch={"note": 1}, seed=0)
        assert teacher(torch.rand(1, 3, 256, 256)).shape == (1, 64, 12) and not teacher.training
        seen = sys.modules["toy_family_pkg"].SEEN
        assert seen == [TeacherRequest(grid=(8, 8), arch={"note": 1})]
        with pytest.raises(TypeError, match=r"Teacher 'toy-fam' got unknown keyword arguments \['gird'\]; a teacher "):
            create_teacher("toy-fam", gird=(8, 8))
    finally:
        _registry._REGISTRY.pop("toy-fam", None)
        sys.modules.pop("toy_family_pkg", None)


def test_an_old_style_keyword_factory_gets_the_whole_request(tmp_path, monkeypatch):
    """``register_teacher`` factories keep their keyword signature; ``build_teacher`` passes every request field."""
    got = {}

    @register_teacher("kw-toy")
    def make(extra_option, **kw):
        got.update(kw, extra_option=extra_option)
        return create_teacher("c-radio-v3-b", **dict(kw, arch=TINY_VIT))

    try:
        with pytest.warns(UserWarning, match="RANDOM"):
            teacher = build_teacher("kw-toy", allow_random=True, resolution=128, extra_option="x")
        assert got == {**TeacherRequest(allow_random=True, resolution=128).kwargs(), "extra_option": "x"}
        assert teacher.resolution == 128 and teacher.grid == (16, 16)
    finally:
        _registry._REGISTRY.pop("kw-toy", None)


def test_request_fields_are_the_positional_order_of_build_radio_teacher():
    from openvla_align.teachers.radio import build_radio_teacher

    assert REQUEST_FIELDS == ("path", "resolution", "grid", "allow_random", "trust_remote_code", "arch")
    with pytest.warns(UserWarning, match="RANDOM"):
        teacher = build_radio_teacher("c-radio-v3-b", None, 64, (8, 8), True, False, TINY_VIT)
    assert (teacher.resolution, teacher.grid) == (64, (8, 8))


def test_a_broken_plugin_is_reported_once_and_hides_no_other(tmp_path, monkeypatch, caplog):
    """Two third-party distributions: the one found first raises on import; the other still loads."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    _write_plugin(
        first, "broken_teacher_pkg", "raise ImportError('no such backbone')\n", "broken = broken_teacher_pkg:make"
    )
    _write_plugin(
        second,
        "good_teacher_pkg",
        """
        from openvla_align.teachers.radio import build_radio_teacher
        from openvla_align.tiny.model import TINY_VIT as TINY_ARCH

        def make(path=None, resolution=None, grid=(16, 16), allow_random=False, trust_remote_code=False, arch=None):
            args = (path, resolution, grid, allow_random, trust_remote_code, TINY_ARCH)
            return build_radio_teacher("c-radio-v3-b", *args)
        """,
        "good = good_teacher_pkg:make",
    )
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))  # the broken distribution comes first
    try:
        with caplog.at_level("ERROR", logger="openvla_align.teachers._registry"):
            load_plugins(force=True)  # no raise
            assert "good" in list_teachers() and "broken" not in list_teachers()
            load_plugins()
            list_teachers()
        reports = [r.getMessage() for r in caplog.records]
        assert len(reports) == 1 and re.search(r"Teacher plugin 'broken' .*no such backbone", reports[0])
        assert broken_plugins() == {"broken": reports[0]}
        with pytest.raises(TeacherPluginError, match=r"Teacher plugin 'broken' .*no such backbone"):
            create_teacher("broken")
        with pytest.raises(ValueError, match=r"Unknown teacher 'brokn'.* \(plugins that failed to load: broken\)"):
            create_teacher("brokn")
        with pytest.warns(UserWarning, match="RANDOM"):
            assert create_teacher("good", allow_random=True).width == 32
    finally:
        _registry._REGISTRY.pop("good", None)
        _registry._BROKEN.pop("broken", None)
        for name in ("broken_teacher_pkg", "good_teacher_pkg"):
            sys.modules.pop(name, None)


def test_build_teacher_is_the_one_way_in():
    import warnings

    from openvla_align.config import AlignConfig
    from openvla_align.teachers import build_teacher, teacher_from_config
    from openvla_align.tiny.model import TINY_VIT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        a = build_teacher("c-radio-v3-l", allow_random=True, arch=TINY_VIT, seed=3)
        b = build_teacher("c-radio-v3-l", allow_random=True, arch=TINY_VIT, seed=3)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert next(a.parameters()).dtype == torch.float32  # auto without a device: left to the Aligner
        c = build_teacher("c-radio-v3-l", allow_random=True, arch=TINY_VIT, device="cpu")  # auto on CPU: fp32
        assert next(c.parameters()).dtype == torch.float32
        d = build_teacher("c-radio-v3-l", allow_random=True, arch=TINY_VIT, dtype="bfloat16")
        assert next(d.parameters()).dtype == torch.bfloat16 and not d.training
        cfg = AlignConfig(enabled=True, allow_random_teacher=True, teacher_dtype="float16")
        e = teacher_from_config(cfg, grid=(8, 8), arch=TINY_VIT)
        assert next(e.parameters()).dtype == torch.float16 and e.grid == (8, 8)
