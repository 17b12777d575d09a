import pytest
import torch
import torch.nn as nn

from openvla_align.teachers import Teacher, TeacherSpec
from openvla_align.testing import build_tiny_vla, build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def vla(tokenizer):
    return build_tiny_vla(seed=0, vocab_size=len(tokenizer))


class PatchTeacher(Teacher):
    """Test-local teacher: one conv patchifier (enough to exercise the Teacher contract)."""

    def __init__(self, width=24, patch=16, grid=(16, 16), resolution=None):
        spec = TeacherSpec("patch-test", "test", width, patch, (0.5,) * 3, (0.5,) * 3, 0, "nowhere")
        super().__init__(spec, resolution=resolution, grid=grid)
        torch.manual_seed(123)
        self.conv = nn.Conv2d(3, width, patch, patch)
        self.freeze()

    def _features(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


@pytest.fixture
def teacher():
    return PatchTeacher()


def make_batch(tokenizer, batch_size=2, seed=0, pad_to=None):
    """A right-padded batch with OpenVLA's layout: BOS + prompt + 7 action tokens + EOS, loss on actions only."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for i in range(batch_size):
        prompt = tokenizer(f"In: What action should the robot take to put the cup {'left ' * i}on the plate?\nOut:").input_ids
        actions = (len(tokenizer) - 1 - torch.randint(0, 255, (7,), generator=g)).tolist()
        ids = prompt + actions + [tokenizer.eos_token_id]
        rows.append(ids)
        labels.append([-100] * len(prompt) + actions + [tokenizer.eos_token_id])
    width = max(pad_to or 0, max(len(r) for r in rows))
    input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
    lab = torch.full((batch_size, width), -100)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    pixel_values = torch.randn(batch_size, 6, 224, 224, generator=g)
    return dict(input_ids=input_ids, attention_mask=mask, labels=lab, pixel_values=pixel_values)


@pytest.fixture
def batch(tokenizer):
    return make_batch(tokenizer)
