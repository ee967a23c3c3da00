"""The built-in mini mixture: five tasks, bilingual, deterministic, disjoint splits, valid canonical samples."""

from __future__ import annotations

import hashlib
import time
from collections import Counter

import pytest
from datasets import Image as ImageFeature
from datasets import List

from st_viomni.data import CANONICAL_FEATURES, mini_mixture, mini_samples, validate_samples
from st_viomni.data.mini import PAIR_SCORES, _generate, number_in_words, split_of
from st_viomni.data.mini_render import font_path
from st_viomni.tasks import TASK_NAMES


def _raw(samples):
    """Rows with images as their stored PNG bytes, for exact comparison."""
    undecoded = samples.cast_column("anchor_images", List(ImageFeature(decode=False)))
    return [{**row, "anchor_images": [image["bytes"] for image in row["anchor_images"]]} for row in undecoded]


@pytest.fixture(scope="module")
def train():
    started = time.perf_counter()
    samples = mini_mixture(200, split="train", seed=0)
    # Not asserted (machines differ); the issue asks for < 30 s for 1,000 samples on 2 cores.
    print(f"\nmini_mixture(200): {len(samples)} samples in {time.perf_counter() - started:.2f} s")
    return samples


@pytest.fixture(scope="module")
def test_split():
    return mini_mixture(100, split="test", seed=0)


def test_all_five_tasks_in_shuffled_order(train):
    assert train.features == CANONICAL_FEATURES
    assert Counter(train["task"]) == {task: 200 for task in TASK_NAMES}
    first_tasks = train["task"][:20]
    assert len(set(first_tasks)) >= 4


def test_same_arguments_same_samples_byte_for_byte():
    assert _raw(mini_mixture(8, split="train", seed=5)) == _raw(mini_mixture(8, split="train", seed=5))
    assert _raw(mini_mixture(8, split="train", seed=5)) != _raw(mini_mixture(8, split="train", seed=6))


def test_every_sample_is_valid(train):
    # Raises on the first invalid sample (unknown task, empty text, missing image, bad score, ...).
    assert len(validate_samples(train)) == len(train)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_train_and_test_content_are_disjoint(task):
    train_items = _generate(task, 300, "train", seed=0)
    test_items = _generate(task, 300, "test", seed=0)

    train_keys = {key for _, keys in train_items for key in keys}
    test_keys = {key for _, keys in test_items for key in keys}
    assert train_keys and test_keys and not train_keys & test_keys
    assert {split_of(key) for key in train_keys} == {"train"} and {split_of(key) for key in test_keys} == {"test"}

    def anchors(items):
        return {
            (sample["anchor"], tuple(hashlib.sha1(image["bytes"]).hexdigest() for image in sample["anchor_images"]))
            for sample, _ in items
        }

    assert not anchors(train_items) & anchors(test_items)
    if task in ("text_pair", "instr"):
        # No sentence or instruction of the test split is seen in training, in any role.
        texts = lambda items: {sample[field] for sample, _ in items for field in ("anchor", "positive")}  # noqa: E731
        assert not {sample["anchor"] for sample, _ in test_items} & texts(train_items)


def test_test_split_has_enough_distinct_content(test_split):
    for task in TASK_NAMES:
        rows = test_split.filter(lambda row: row["task"] == task)
        assert len(set(rows["positive"])) >= 25, task


def test_text_pairs_have_graded_scores_and_cross_language_pairs(train):
    pairs = train.filter(lambda row: row["task"] == "text_pair")
    assert set(pairs["score"]) == set(PAIR_SCORES.values())
    vietnamese = set("ăâđêôơưàáảãạằắẳẵặầấẩẫậèéẻẽẹềếểễệìíỉĩịòóỏõọồốổỗộờớởỡợùúủũụừứửữựỳýỷỹỵ")

    def is_vietnamese(text):
        return bool(vietnamese & set(text.lower()))

    languages = Counter((is_vietnamese(a), is_vietnamese(p)) for a, p in zip(pairs["anchor"], pairs["positive"]))
    assert languages[(True, False)] + languages[(False, True)] > 20  # vi <-> en pairs
    assert languages[(True, True)] > 20 and languages[(False, False)] > 20


def test_image_tasks_have_images_and_multi_image_items(train):
    counts = Counter()
    undecoded = train.cast_column("anchor_images", List(ImageFeature(decode=False)))
    for task, images in zip(undecoded["task"], undecoded["anchor_images"]):
        counts[(task, len(images))] += 1
    assert counts[("ocr", 1)] and counts[("ocr", 2)]  # single- and two-image OCR items
    assert counts[("vqa_single", 1)] == 200
    assert counts[("vqa_multi", 1)] and counts[("vqa_multi", 2)]  # dialogues and two-scene comparisons
    assert not any(count for (task, n), count in counts.items() if task in ("text_pair", "instr") and n)


def test_image_only_anchors_give_plain_image_text_pairs(train):
    image_only = Counter(task for task, anchor in zip(train["task"], train["anchor"]) if anchor is None)
    # OCR transcriptions and scene captions: what cross-modal (image <-> text) retrieval is evaluated on.
    assert image_only["ocr"] >= 20 and image_only["vqa_single"] >= 10
    assert set(image_only) == {"ocr", "vqa_single"}


def test_ocr_images_show_the_text_and_the_font_covers_it(train):
    from fontTools.ttLib import TTFont

    ocr = train.filter(lambda row: row["task"] == "ocr")
    transcriptions = [row["positive"] for row in ocr if row["anchor"] is None]
    assert transcriptions and any("đ" in text or "Đ" in text or "Ố" in text for text in ocr["positive"])
    characters = {ord(char) for text in ocr["positive"] for char in text if not char.isspace()}
    assert characters <= set(TTFont(font_path()).getBestCmap())
    image = ocr[0]["anchor_images"][0]
    assert image.height == 56 and image.width % 28 == 0
    assert len(set(image.getdata())) > 2  # anti-aliased text on a background, not a blank image


def test_vqa_multi_turns_carry_the_dialogue_so_far(train):
    turns = [row for row in mini_samples("vqa_multi", 30, seed=0)]
    later = [row for row in turns if "\nA: " in row["anchor"]]
    assert later, "expected multi-turn samples"
    for row in later:
        lines = row["anchor"].split("\n")
        assert lines[0].startswith("Q: ") and lines[-1].startswith("Q: ")
        assert [line[:3] for line in lines] == ["Q: ", "A: "] * (len(lines) // 2) + ["Q: "]


@pytest.mark.parametrize(
    ("number", "english", "vietnamese"),
    [(7, "seven", "bảy"), (10, "ten", "mười"), (15, "fifteen", "mười lăm"), (21, "twenty-one", "hai mươi mốt"),
     (24, "twenty-four", "hai mươi tư"), (55, "fifty-five", "năm mươi lăm"), (90, "ninety", "chín mươi")],
)  # fmt: skip
def test_numbers_in_words(number, english, vietnamese):
    assert (number_in_words(number, "en"), number_in_words(number, "vi")) == (english, vietnamese)
