"""`cache build --dataset --num-images 2` through OpenVLA-OFT's own RLDS pipeline (a LIBERO-schema build: third-person
and wrist cameras): a multi-view teacher's cache holds every sample OFT's training batches hold, keyed as the plugin
keys them (OFT's RLDSBatchTransform with the wrist image, its collator stacking the cameras on the channels, the
processor's normalisation).

Opt-in like the other OFT tests (``scripts/test.sh`` runs them in its OFT phase): ``OPENVLA_OFT_SRC`` and OFT's stack
(tensorflow, tensorflow_datasets, dlimp; this process imports OFT's ``prismatic``)."""

import warnings

import oft_assets as A
import pytest
import torch

pytestmark = pytest.mark.skipif(bool(A.oft_unavailable()), reason=str(A.oft_unavailable()))


def test_multi_view_cache_over_ofts_pipeline_holds_every_training_sample(tmp_path):
    A.oft_src()
    from prismatic.models.backbones.llm.prompting import PurePromptBuilder
    from prismatic.util.data_utils import PaddedCollatorForActionPrediction
    from prismatic.vla.action_tokenizer import ActionTokenizer
    from prismatic.vla.datasets import RLDSBatchTransform, RLDSDataset
    from transformers import AutoProcessor

    from openvla_align import AlignConfig
    from openvla_align.cache.build import build_cache, rlds_frames
    from openvla_align.targets.cache import TeacherCache, open_for_training
    from openvla_align.targets.frame_keys import keys_from_pixel_values, sample_keys
    from openvla_align.tiny import tiny_teacher
    from openvla_align.vla.pixels import split_images

    data = tmp_path / "data"
    A.write_tiny_libero_rlds(data, episodes=3, steps=10, seed=0)  # OFT keeps the steps with a whole chunk: 3 each
    with pytest.raises(ValueError, match=r"reads 2 camera\(s\) per step .* \(image_primary, image_wrist\)"):
        rlds_frames(data, A.LIBERO_DATASET, num_images=3)
    samples, source = rlds_frames(data, A.LIBERO_DATASET, num_images=2)
    assert source["cameras"] == ["image_primary", "image_wrist"] and source["dataset"] == A.LIBERO_DATASET
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = tiny_teacher("vggt-1b", seed=0)
    summary = build_cache(
        tmp_path / "c", teacher, samples, source=source, teacher_name="vggt-1b", progress=False, batch_size=8
    )
    assert (summary["rows"], summary["views"], summary["stored"]) == ("samples", 2, 9)
    cache = open_for_training(
        AlignConfig(enabled=True, teacher="vggt-1b", teacher_cache=str(tmp_path / "c")),
        A.LIBERO_DATASET,
        data,
        views=2,
    )

    ckpt = A.build_tiny_oft_checkpoint(tmp_path / "tiny-oft", seed=0)
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    transform = RLDSBatchTransform(
        ActionTokenizer(processor.tokenizer),
        processor.tokenizer,
        image_transform=processor.image_processor.apply_transform,
        prompt_builder_fn=PurePromptBuilder,
        use_wrist_image=True,
        use_proprio=True,
    )
    dataset = RLDSDataset(data, A.LIBERO_DATASET, transform, resize_resolution=(224, 224), shuffle_buffer_size=8)
    collator = PaddedCollatorForActionPrediction(
        processor.tokenizer.model_max_length, processor.tokenizer.pad_token_id, padding_side="right"
    )
    batch = collator([s for s, _ in zip(dataset, range(6))])
    assert batch["pixel_values"].shape == (6, 12, 224, 224)  # two cameras stacked on the channels, as OFT trains
    images = split_images(batch["pixel_values"])
    assert all(k in cache for k in sample_keys(keys_from_pixel_values(images), 2))
    assert isinstance(cache, TeacherCache) and cache.targets(images, views=2).shape == (6, 512, teacher.width)
    swapped = torch.cat([batch["pixel_values"][:, 6:], batch["pixel_values"][:, :6]], dim=1)
    assert not any(k in cache for k in sample_keys(keys_from_pixel_values(split_images(swapped)), 2))
