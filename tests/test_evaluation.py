import logging
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from PIL import Image

from st_viomni.data import CANONICAL_FEATURES
from st_viomni.evaluation import build_evaluator, summarize

COLOURS = {(255, 0, 0): "red", (0, 128, 0): "green", (0, 0, 255): "blue", (255, 255, 0): "yellow",
           (128, 0, 128): "purple", (255, 165, 0): "orange"}


def _image(colour):
    return Image.new("RGB", (56, 56), colour)


def _sample(task, anchor, positive, images=(), score=None):
    return {"task": task, "anchor": anchor, "anchor_images": list(images), "positive": positive,
            "positive_images": [], "score": score}


def _samples():
    red, green, blue, yellow, purple, orange = map(_image, ("red", "green", "blue", "yellow", "purple", "orange"))
    rows = [
        _sample("text_pair", "A cat sleeps.", "The cat is sleeping.", score=0.95),
        _sample("text_pair", "A cat sleeps.", "A cat is asleep.", score=0.9),  # one anchor, two positives
        _sample("text_pair", "The cat is sleeping.", "Cats nap.", score=0.8),  # an anchor that is a document
        _sample("text_pair", "Birds sing.", "The birds are singing.", score=0.9),
        _sample("text_pair", "A dog runs.", "It is raining.", score=0.0),
        _sample("instr", "2 + 2?", "4"),
        _sample("instr", "3 + 3?", "6"),
        _sample("ocr", None, "HOTEL", [red]),
        _sample("ocr", None, "HOTEL", [red]),  # the same pair twice
        _sample("ocr", None, "HOTEL", [green]),  # two pictures of one text
        _sample("ocr", None, "BAKERY", [blue]),
        _sample("ocr", "What does it say?", "HOTEL", [green]),  # not image-only: no cross-modal pair
        _sample("vqa_single", None, "a yellow square", [yellow]),
        _sample("vqa_single", "Colour?", "purple", [purple]),
        _sample("vqa_single", "Colour?", "orange", [orange]),
    ]
    return Dataset.from_list(rows, features=CANONICAL_FEATURES)


class MeaningEncoder:
    """A stand-in model whose embedding of an input is the one-hot vector of what the input means: texts by
    ``TEXTS`` (else themselves), images by ``images`` (their colour's meaning)."""

    TEXTS = {"The cat is sleeping.": "cat", "A cat sleeps.": "cat", "A cat is asleep.": "cat", "Cats nap.": "cat",
             "Birds sing.": "birds", "The birds are singing.": "birds", "2 + 2?": "4", "3 + 3?": "6"}
    IMAGES = {"red": "HOTEL", "green": "HOTEL", "blue": "BAKERY", "yellow": "a yellow square",
              "purple": "purple", "orange": "orange"}

    similarity_fn_name = "dot"  # evaluation ranks by cosine whatever the model's own similarity
    model_card_data = SimpleNamespace(set_evaluation_metrics=lambda *args: None)

    def __init__(self, images=None):
        self.images = images or self.IMAGES
        self.dimensions: dict[str, int] = {}

    def meaning(self, item):
        if isinstance(item, dict):
            return self.images[COLOURS[item["image"][0].getpixel((0, 0))]]
        text = item.split(" ", 1)[1]  # drop the task prefix
        return self.TEXTS.get(text, text)

    def encode(self, inputs, convert_to_tensor=False, **kwargs):
        rows = [self.dimensions.setdefault(self.meaning(item), len(self.dimensions)) for item in inputs]
        embeddings = torch.nn.functional.one_hot(torch.tensor(rows), 32).float()
        return embeddings if convert_to_tensor else embeddings.numpy()

    encode_query = encode_document = encode


def _relevant_texts(evaluator):
    """query -> sorted relevant documents, both as plain text (prefix dropped; images by colour)."""
    def show(item):
        if isinstance(item, dict):
            return "+".join(COLOURS[image.getpixel((0, 0))] for image in item["image"])
        return item.split(" ", 1)[1]

    corpus = dict(zip(evaluator.corpus_ids, evaluator.corpus))
    return {show(query): sorted(show(corpus[doc]) for doc in evaluator.relevant_docs[qid])
            for qid, query in zip(evaluator.queries_ids, evaluator.queries)}


def test_evaluators_cover_every_task_cross_modal_and_spearman():
    evaluator = build_evaluator(_samples())
    names = [child.name for child in evaluator.evaluators]
    assert names == ["text_pair", "instr", "ocr", "vqa_single", "image_to_text", "text_to_image",
                     "text_pair_similarity"]
    text_pair, _, ocr, _, image_to_text, text_to_image, _ = evaluator.evaluators
    # One query per distinct anchor, relevant to all its positives; the anchor that is also a document (its
    # copy would rank first for any model) and the 0-scored pair are no queries; every positive is a document.
    assert _relevant_texts(text_pair) == {"A cat sleeps.": ["A cat is asleep.", "The cat is sleeping."],
                                          "Birds sing.": ["The birds are singing."]}
    assert len(text_pair.corpus) == 5
    assert len(ocr.corpus) == 2  # "HOTEL" four times is one document
    assert _relevant_texts(image_to_text) == {"red": ["HOTEL"], "green": ["HOTEL"], "blue": ["BAKERY"],
                                              "yellow": ["a yellow square"]}
    assert _relevant_texts(text_to_image) == {"HOTEL": ["green", "red"], "BAKERY": ["blue"],
                                              "a yellow square": ["yellow"]}


def test_an_encoder_that_maps_every_input_to_its_meaning_scores_one_everywhere():
    summary = summarize(build_evaluator(_samples())(MeaningEncoder()))
    accuracies = {name: value for name, value in summary.items() if name != "text_pair_spearman"}
    assert accuracies == {"accuracy@1/text_pair": 1.0, "accuracy@1/instr": 1.0, "accuracy@1/ocr": 1.0,
                          "accuracy@1/vqa_single": 1.0, "image_to_text_accuracy@1": 1.0,
                          "text_to_image_accuracy@1": 1.0}


def test_cross_modal_scores_are_the_fraction_of_queries_whose_first_document_is_relevant():
    # Every picture looks like "BAKERY": each image query's first text is BAKERY (1 of 4 right); every image
    # ties for each text, the first image (red) ranks first (ties go to the first document), relevant to HOTEL
    # only (1 of 3).
    blind = MeaningEncoder(images=dict.fromkeys(MeaningEncoder.IMAGES, "BAKERY"))
    summary = summarize(build_evaluator(_samples())(blind))
    assert summary["image_to_text_accuracy@1"] == 0.25
    assert summary["text_to_image_accuracy@1"] == pytest.approx(1 / 3)
    assert summary["accuracy@1/text_pair"] == 1.0  # texts are unaffected


def test_evaluators_with_nothing_to_rank_are_left_out_with_a_warning(caplog):
    red, green, blue = map(_image, ("red", "green", "blue"))
    rows = [_sample("ocr", None, "HOTEL", [red]), _sample("ocr", None, "HOTEL", [green]),  # one text only
            _sample("instr", "2 + 2?", "4"), _sample("instr", "3 + 3?", "6"),
            _sample("text_pair", "A cat sleeps.", "The cat is sleeping.", score=0.9),
            _sample("text_pair", "Birds sing.", "The birds are singing.", score=0.9)]  # one gold score only
    with caplog.at_level(logging.WARNING, logger="st_viomni.evaluation"):
        evaluator = build_evaluator(Dataset.from_list(rows, features=CANONICAL_FEATURES))
    assert [child.name for child in evaluator.evaluators] == ["text_pair", "instr"]
    warned = " ".join(record.getMessage() for record in caplog.records)
    for name in ("no ocr evaluator", "no image_to_text evaluator", "no text_to_image evaluator",
                 "no text_pair_similarity evaluator"):
        assert name in warned


def test_a_set_too_small_for_any_evaluator_says_what_each_task_lacks():
    rows = [_sample("ocr", None, "HOTEL", [_image("red")]), _sample("instr", "2 + 2?", "4")]
    with pytest.raises(ValueError, match=r"no evaluator can be built from these samples \(instr 1, ocr 1\): "
                                         r"instr: nothing to rank: 1 queries, 1 documents; ocr: nothing"):
        build_evaluator(rows)


def test_summarize_reads_trainer_prefixed_keys():
    results = {"eval_ocr_cosine_accuracy@1": 0.5, "eval_text_pair_similarity_spearman_cosine": 0.25,
               "eval_image_to_text_cosine_accuracy@1": 0.125, "eval_ocr_cosine_accuracy@5": 0.9}
    assert summarize(results) == {"accuracy@1/ocr": 0.5, "image_to_text_accuracy@1": 0.125, "text_pair_spearman": 0.25}


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no evaluation sample"):
        build_evaluator([])
