import pytest
from datasets import Dataset
from PIL import Image

from st_viomni.data import CANONICAL_FEATURES
from st_viomni.evaluation import build_evaluator, summarize


def _sample(task, anchor, positive, images=(), score=None):
    return {"task": task, "anchor": anchor, "anchor_images": list(images), "positive": positive,
            "positive_images": [], "score": score}


def _samples():
    red, blue, green = (Image.new("RGB", (56, 56), colour) for colour in ("red", "blue", "green"))
    rows = [
        _sample("text_pair", "A cat sleeps.", "The cat is sleeping.", score=0.95),
        _sample("text_pair", "A dog runs.", "It is raining.", score=0.0),
        _sample("text_pair", "Birds sing.", "The birds are singing.", score=0.9),
        _sample("instr", "2 + 2?", "4"),
        _sample("instr", "3 + 3?", "6"),
        _sample("ocr", None, "HOTEL", [red]),
        _sample("ocr", None, "BAKERY", [blue]),
        _sample("ocr", "What does it say?", "HOTEL", [green]),
        _sample("vqa_single", "Colour?", "red", [red]),
        _sample("vqa_single", "Colour?", "blue", [blue]),
    ]
    return Dataset.from_list(rows, features=CANONICAL_FEATURES)


def test_evaluators_cover_every_task_cross_modal_and_spearman(tiny_model):
    evaluator = build_evaluator(_samples())
    names = [child.name for child in evaluator.evaluators]
    assert names == ["text_pair", "instr", "ocr", "vqa_single", "image_to_text", "text_to_image", "text_pair_similarity"]
    text_pair, _, ocr, _, image_to_text, text_to_image, _ = evaluator.evaluators
    assert len(text_pair.queries) == 2 and len(text_pair.corpus) == 3  # the 0-scored pair is no query
    assert len(ocr.corpus) == 2  # "HOTEL" twice is one document
    assert len(image_to_text.queries) == 2 and len(text_to_image.queries) == 2  # image-only OCR anchors
    summary = summarize(evaluator(tiny_model))
    assert set(summary) == {
        "recall@1/text_pair", "recall@1/instr", "recall@1/ocr", "recall@1/vqa_single",
        "image_to_text_recall@1", "text_to_image_recall@1", "text_pair_spearman",
    }
    assert all(-1.0 <= value <= 1.0 for value in summary.values())


def test_summarize_reads_trainer_prefixed_keys():
    results = {"eval_ocr_cosine_accuracy@1": 0.5, "eval_text_pair_similarity_spearman_cosine": 0.25,
               "eval_image_to_text_cosine_accuracy@1": 0.125, "eval_ocr_cosine_accuracy@5": 0.9}
    assert summarize(results) == {"recall@1/ocr": 0.5, "image_to_text_recall@1": 0.125, "text_pair_spearman": 0.25}


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no evaluation sample"):
        build_evaluator([])
