"""build_training_dataset: canonical samples -> (anchor, positive, label) rows the collator and the loss take."""

from __future__ import annotations

import math

import pytest
from datasets import Dataset, IterableDataset
from PIL import Image

from st_viomni import format_input
from st_viomni.data import (
    CANONICAL_FEATURES,
    InvalidRowError,
    ValidationReport,
    build_training_dataset,
    mini_mixture,
    render_sample,
    vqa_single_samples,
)
from st_viomni.losses.labels import make_label


@pytest.fixture(scope="module")
def canonical():
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    rows = [
        _sample("text_pair", "Con mèo ngủ.", [], "The cat sleeps.", score=0.9),
        _sample("instr", "What is 2 + 3?", [], "2 + 3 = 5"),
        _sample("ocr", None, [image], "LỐI RA"),
        _sample("vqa_single", "Màu gì?", [image], "Đỏ."),
        _sample("vqa_multi", "Q: A?\nA: B.\nQ: C?", [image, image], "D."),
    ]
    return Dataset.from_list(rows, features=CANONICAL_FEATURES)


def _sample(task, anchor, anchor_images, positive, score=None):
    return {
        "task": task,
        "anchor": anchor,
        "anchor_images": anchor_images,
        "positive": positive,
        "positive_images": [],
        "score": score,
    }


def _same_input(left, right) -> bool:
    if isinstance(left, str) or isinstance(right, str):
        return left == right
    return left["text"] == right["text"] and [image.tobytes() for image in left["image"]] == [
        image.tobytes() for image in right["image"]
    ]


def test_rows_are_format_input_and_make_label_in_trainer_column_order(canonical):
    training = build_training_dataset(canonical)

    rows = [training[index] for index in range(len(canonical))]

    for row, sample in zip(rows, canonical):
        assert list(row) == ["anchor", "positive", "label"]
        assert _same_input(row["anchor"], format_input(sample["task"], sample["anchor"], sample["anchor_images"]))
        assert row["positive"] == format_input(sample["task"], sample["positive"])
        expected = make_label(sample["task"], sample["score"], positive_text=sample["positive"])
        assert row["label"][0] == expected[0] and row["label"][2:] == expected[2:]
    assert rows[0]["anchor"] == "<text_pair> Con mèo ngủ."
    assert rows[0]["label"][1] == pytest.approx(0.9)
    assert rows[2]["anchor"]["text"] == "<ocr>"  # image-only anchor: the prefix alone
    assert math.isnan(rows[1]["label"][1])
    assert len(rows[4]["anchor"]["image"]) == 2


def test_stream_renders_the_same_rows_lazily(canonical):
    training = build_training_dataset(canonical.to_iterable_dataset())

    assert isinstance(training, IterableDataset)
    assert training.column_names == ["anchor", "positive", "label"]
    streamed = list(training)
    assert len(streamed) == len(canonical)
    for row, expected in zip(streamed, (render_sample(sample) for sample in canonical)):
        assert _same_input(row["anchor"], expected["anchor"]) and row["positive"] == expected["positive"]


def test_bad_label_fields_raise_or_are_skipped(canonical):
    bad = Dataset.from_list(
        [*canonical.select([0, 1]), _sample("text_pair", "a", [], "b", score=1.5)],
        features=CANONICAL_FEATURES,
    )
    with pytest.raises(InvalidRowError, match="row 2, column 'score': score_out_of_range"):
        build_training_dataset(bad)

    report = ValidationReport()
    assert len(build_training_dataset(bad, on_error="skip", report=report)) == 2
    assert report.counts == {"score_out_of_range": 1}

    streamed_report = ValidationReport()
    streamed = list(build_training_dataset(bad.to_iterable_dataset(), on_error="skip", report=streamed_report))
    assert len(streamed) == 2 and streamed_report.counts == {"score_out_of_range": 1}


def test_rejects_rows_without_canonical_columns():
    with pytest.raises(ValueError, match="canonical column"):
        build_training_dataset(Dataset.from_dict({"anchor": ["a"], "positive": ["b"]}))


def test_a_mixed_batch_goes_through_the_collator_and_the_tiny_model(tiny_model, canonical):
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    training = build_training_dataset(canonical)
    collator = SentenceTransformerDataCollator(preprocess_fn=tiny_model.preprocess)

    batch = collator([training[index] for index in range(len(training))])

    assert batch["label"].shape == (5, 4)
    assert batch["anchor_input_ids"].shape[0] == batch["positive_input_ids"].shape[0] == 5
    assert batch["anchor_image_grid_thw"].shape[0] == 4  # 1 + 1 + 2 images
    features = {key.removeprefix("anchor_"): value for key, value in batch.items() if key.startswith("anchor_")}
    embeddings = tiny_model(features)["sentence_embedding"]
    assert embeddings.shape == (5, 32)


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "iterable"])
def test_the_trainer_takes_a_step_on_the_mini_mixture(tiny_model, tmp_path, streaming):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    samples = mini_mixture(2, split="train", seed=0)
    train_dataset = build_training_dataset(samples.to_iterable_dataset() if streaming else samples)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=5,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        # accelerate's default for iterable datasets slices every batch tensor to the batch size along dim 0,
        # which cuts Qwen2-VL's flattened pixel_values: streamed multimodal batches need dispatching off.
        accelerator_config={"dispatch_batches": False},
    )
    # A stock loss stands in for PrefixRoutedLoss: this checks the trainer plumbing, not the loss.
    trainer = SentenceTransformerTrainer(
        model=tiny_model, args=args, train_dataset=train_dataset, loss=MultipleNegativesRankingLoss(tiny_model)
    )

    result = trainer.train()

    assert result.global_step == 1 and math.isfinite(result.training_loss)


@pytest.fixture
def unverified_vqa(tmp_path):
    """Six vqa_single samples validated with verify_images=False; row 3's image is a corrupt PNG."""
    Image.new("RGB", (32, 32), "red").save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [
        {"images": "bad.png" if index == 3 else "ok.png", "question": f"q{index}", "answer": f"a{index}"}
        for index in range(6)
    ]

    def samples(streaming):
        dataset = Dataset.from_list(rows)
        dataset = dataset.to_iterable_dataset() if streaming else dataset
        return vqa_single_samples(dataset, image_root=str(tmp_path), verify_images=False, on_error="skip")

    return samples


def _trainer_rows(training, streaming):
    # What the trainer's DataLoader does: iterate a stream, fetch a batch of indices from a Dataset.
    return list(training) if streaming else training.__getitems__(list(range(len(training))))


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "iterable"])
def test_an_unverified_corrupt_image_is_skipped_when_rendered_and_reported_with_its_path(unverified_vqa, streaming):
    report = ValidationReport()
    training = build_training_dataset(unverified_vqa(streaming), on_error="skip", report=report)

    rows = _trainer_rows(training, streaming)

    assert [row["positive"] for row in rows] == [f"<vqa_single> a{index}" for index in (0, 1, 2, 4, 5)]
    assert report.counts == {"unreadable_image": 1}
    (problem,) = report.examples["unreadable_image"]
    assert problem["column"] == "anchor_images[0]" and "bad.png" in problem["detail"]
    # A stream knows the sample's position; a Dataset's transform sees a batch, not its indices.
    assert problem["row"] == (3 if streaming else None)


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "iterable"])
def test_an_unverified_corrupt_image_raises_naming_the_file(unverified_vqa, streaming):
    training = build_training_dataset(unverified_vqa(streaming))

    with pytest.raises(InvalidRowError, match=r"column 'anchor_images\[0\]': unreadable_image: .*bad\.png"):
        _trainer_rows(training, streaming)
