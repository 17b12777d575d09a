"""`openvla-align data`: reading collector episodes safely, the paper's step rules, bad files, and an RLDS round trip
(read back with tensorflow-datasets, which OpenVLA's pinned stack and the openvla-pins CI venv have)."""

import importlib.util
import pickle

import numpy as np
import pytest

from openvla_align.cli import main
from openvla_align.data import Episode, EpisodeError, episode_steps, keep_mask, load_episode
from openvla_align.data.build import check_files, select_files
from openvla_align.data.synth import synthetic_episode, write_synthetic_episodes

from conftest import cli_fails

HAVE_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
needs_tfds = pytest.mark.skipif(not HAVE_TFDS, reason="pip install tensorflow==2.15.0 tensorflow_datasets==4.9.3")


def test_keep_mask_is_the_papers_rule():
    a = np.zeros((6, 7), dtype=np.float32)
    a[0, :3] = [0.011, 0, 0]  # translation just above 0.01: kept
    a[1, :3] = [0.009, 0, 0]  # below, no rotation: dropped
    a[2, 3:6] = [0.061, 0, 0]  # rotation just above 0.06: kept
    a[3, 3:6] = [0.059, 0, 0]  # below: dropped
    a[4, 6] = 1.0  # near-zero motion but the gripper toggles: kept
    a[5, 6] = 1.0  # same gripper as before, no motion: dropped
    assert keep_mask(a).tolist() == [True, False, True, False, True, False]


def test_early_stop_after_six_successes_reads_info_as_the_reference_does(tmp_path):
    n = 12
    actions = np.zeros((n, 7), dtype=np.float32)
    actions[:, 0] = 0.05
    actions[3, 0] = 0.0  # dropped: shifts kept step k onto original step k+1 from here on
    success = np.array([False, False] + [True] * 10)
    episode = Episode(tmp_path, "put", np.zeros((n, 2, 2, 3), np.uint8), actions, success)
    # kept: 0 1 2 4 5 6 ...; success is read at the k-th info (k = 0, 1, 2, ...): True from k = 2, so the sixth
    # success in a row is k = 7 -> original step 8, the last one written
    assert episode_steps(episode) == [0, 1, 2, 4, 5, 6, 7, 8]
    assert episode_steps(Episode(tmp_path, "put", episode.images, actions, np.zeros(n, bool))) == [
        i for i in range(n) if i != 3
    ]


def test_collector_files_load_and_foreign_pickles_are_refused(tmp_path):
    (path,) = write_synthetic_episodes(tmp_path / "ep", 1, steps=8, size=(48, 64))
    ep = load_episode(path)
    assert ep.images.shape == (8, 48, 64, 3) and ep.actions.shape == (8, 7) and ep.success.dtype == bool
    assert ep.instruction.startswith("put ")

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    np.savez_compressed(tmp_path / "evil.npz", {"image": [], "instruction": "x", "action": [], "info": Evil()})
    with pytest.raises(EpisodeError, match=r"evil.npz: unreadable episode file \(refusing to unpickle"):
        load_episode(tmp_path / "evil.npz")
    assert not (tmp_path / "pwned").exists()


def test_bad_files_are_named_and_selection_holds_back_the_last(tmp_path):
    paths = write_synthetic_episodes(tmp_path, 6, steps=6, size=(24, 32))
    train, spare = select_files(tmp_path, train=4, held_back=2)
    assert [p.name for p in train] == [p.name for p in paths[:4]] and spare == paths[4:]
    with pytest.raises(ValueError, match="has 6 episode files; 5 training \\+ 2 held back need 7"):
        select_files(tmp_path, train=5, held_back=2)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # truncated
    raw = bytearray(paths[2].read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # corrupt compressed data
    paths[2].write_bytes(bytes(raw))
    problems = list(check_files(train).values())
    assert len(problems) == 2 and paths[1].name in problems[0] and paths[2].name in problems[1]
    with pytest.raises(EpisodeError, match=paths[1].name):
        load_episode(paths[1])


@needs_tfds
def test_build_round_trips_through_tfds(tmp_path):
    import tensorflow_datasets as tfds

    paths = write_synthetic_episodes(tmp_path / "episodes", 5, steps=12, size=(48, 64), seed=3)
    assert (
        main(["data", "build", str(tmp_path / "episodes"), str(tmp_path / "rlds"), "--train", "4", "--held-back", "1"])
        == 0
    )
    builder = tfds.builder_from_directory(str(tmp_path / "rlds" / "sft" / "1.0.0"))
    episodes = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(episodes) == 4
    by_path = {e["episode_metadata"]["file_path"].decode(): e for e in episodes}
    for path in paths[:4]:
        source = load_episode(path)
        got = by_path[str(path)]
        steps = list(got["steps"])
        kept = episode_steps(source)
        assert len(steps) == len(kept) < len(source.actions)
        for step, i in zip(steps, kept):
            np.testing.assert_array_equal(step["action"], source.actions[i])
            assert step["language_instruction"].decode() == source.instruction
            image = step["observation"]["image"]
            assert image.shape == (48, 64, 3) and np.abs(image.astype(int) - source.images[i]).mean() < 4  # JPEG
    assert str(paths[4]) not in by_path  # held back


@needs_tfds
def test_build_refuses_bad_files_and_writes_nothing(tmp_path, capsys):
    paths = write_synthetic_episodes(tmp_path / "episodes", 4, steps=6, size=(24, 32))
    paths[0].write_bytes(paths[0].read_bytes()[:100])
    args = ["data", "build", str(tmp_path / "episodes"), str(tmp_path / "rlds"), "--train", "3", "--held-back", "1"]
    cli_fails(capsys, args, r"1 bad episode file\(s\), nothing written: .*episode_000.npz")
    assert not (tmp_path / "rlds" / "sft" / "1.0.0").exists()
    assert main([*args, "--skip-bad", "--train", "2"]) == 0
    assert "skipped: " in capsys.readouterr().out


def test_synthetic_episode_shape():
    ep = synthetic_episode(np.random.default_rng(0), steps=9, size=(16, 20))
    assert len(ep["image"]) == len(ep["action"]) == len(ep["info"]) == 9
    assert pickle.loads(pickle.dumps(ep["info"][0]))["success"] in (True, False)
