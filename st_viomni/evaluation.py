"""Evaluate a viOmni model on canonical samples with sentence-transformers' own evaluators.

:func:`build_evaluator` turns a held-out set of canonical samples (``task, anchor, anchor_images, positive,
positive_images, score``, e.g. ``mini_mixture(n, split="test")``) into one ``SequentialEvaluator``:

* ``<task>`` for every task present: an ``InformationRetrievalEvaluator`` whose queries are the rendered
  anchors and whose corpus is the distinct rendered positives of that task; a query's relevant documents are
  the positives identical to its own. For ``text_pair`` only pairs scored at least 0.5 are queries (an
  unrelated pair has no positive to retrieve), while every pair's second text stays in the corpus.
* ``image_to_text`` and ``text_to_image``: the cross-modal pairs of the OCR and VQA samples whose anchor is
  images only (a picture of text and its transcription, a scene and its caption): images → their text and
  text → their images, against all such pairs.
* ``text_pair_similarity``: an ``EmbeddingSimilarityEvaluator`` (Spearman correlation between cosine similarity
  and the gold score).

:func:`summarize` reads the headline numbers from the evaluator's result dict: ``recall@1`` is the fraction of
queries whose top-ranked document is relevant (sentence-transformers' ``accuracy@1``).

Example:
    ::

        from st_viomni.data import mini_mixture
        from st_viomni.evaluation import build_evaluator, summarize

        evaluator = build_evaluator(mini_mixture(40, split="test"))
        print(summarize(evaluator(model)))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sentence_transformers.base.evaluation import SequentialEvaluator
from sentence_transformers.sentence_transformer.evaluation import (
    EmbeddingSimilarityEvaluator,
    InformationRetrievalEvaluator,
)

from .formatting import format_input
from .losses.labels import positive_key
from .tasks import TASK_NAMES, get_task

TEXT_PAIR_RELEVANCE = 0.5
CROSS_MODAL_TASKS = ("ocr", "vqa_single", "vqa_multi")
CROSS_MODAL = ("image_to_text", "text_to_image")


def build_evaluator(samples: Iterable[Mapping[str, Any]], *, batch_size: int = 32) -> SequentialEvaluator:
    """Build the evaluators described in the module docstring from canonical samples.

    Args:
        samples: Canonical samples (a ``datasets.Dataset`` or any iterable of dicts).
        batch_size: Encoding batch size.

    Raises:
        ValueError: No sample gives any evaluator (e.g. an empty set).
    """
    by_task: dict[str, list[Mapping[str, Any]]] = {name: [] for name in TASK_NAMES}
    for sample in samples:
        by_task[get_task(sample["task"]).name].append(sample)
    evaluators = []
    for task, rows in by_task.items():
        evaluator = _task_retrieval(task, rows, batch_size)
        if evaluator is not None:
            evaluators.append(evaluator)
    cross_modal = [row for task in CROSS_MODAL_TASKS for row in by_task[task] if _is_image_only_pair(row)]
    if cross_modal:
        evaluators.extend(_cross_modal_retrieval(cross_modal, batch_size))
    pairs = by_task["text_pair"]
    if len(pairs) >= 2:
        evaluators.append(
            EmbeddingSimilarityEvaluator(
                [format_input("text_pair", row["anchor"]) for row in pairs],
                [format_input("text_pair", row["positive"]) for row in pairs],
                [float(row["score"]) for row in pairs],
                batch_size=batch_size,
                main_similarity="cosine",
                similarity_fn_names=["cosine"],
                name="text_pair_similarity",
                write_csv=False,
            )
        )
    if not evaluators:
        raise ValueError("no evaluation sample: build_evaluator needs canonical samples of at least one task")
    return SequentialEvaluator(evaluators, main_score_function=lambda scores: sum(scores) / len(scores))


def summarize(results: Mapping[str, float]) -> dict[str, float]:
    """Headline metrics from a ``build_evaluator`` result: ``recall@1/<task>``, ``image_to_text_recall@1``,
    ``text_to_image_recall@1`` and ``text_pair_spearman`` (only those that were evaluated)."""
    summary = {}
    for name in (*TASK_NAMES, *CROSS_MODAL):
        value = _find(results, f"{name}_cosine_accuracy@1")
        if value is not None:
            summary[f"recall@1/{name}" if name in TASK_NAMES else f"{name}_recall@1"] = value
    spearman = _find(results, "text_pair_similarity_spearman_cosine")
    if spearman is not None:
        summary["text_pair_spearman"] = spearman
    return summary


def _find(results: Mapping[str, float], suffix: str) -> float | None:
    # Keys carry the trainer's "eval_" prefix when the trainer runs the evaluator.
    matches = [value for key, value in results.items() if key == suffix or key.endswith("_" + suffix)]
    return float(matches[0]) if matches else None


def _is_image_only_pair(sample: Mapping[str, Any]) -> bool:
    return bool(sample["anchor_images"]) and not sample["anchor"] and bool(sample["positive"])


def _task_retrieval(task: str, rows: list[Mapping[str, Any]], batch_size: int) -> InformationRetrievalEvaluator | None:
    corpus: dict[str, Any] = {}
    key_to_corpus_id: dict[int, str] = {}
    queries: dict[str, Any] = {}
    relevant: dict[str, set[str]] = {}
    for index, row in enumerate(rows):
        key = positive_key(row["positive"], row["positive_images"])
        if key not in key_to_corpus_id:
            key_to_corpus_id[key] = f"d{len(key_to_corpus_id)}"
            corpus[key_to_corpus_id[key]] = format_input(task, row["positive"], row["positive_images"])
        if task == "text_pair" and float(row["score"]) < TEXT_PAIR_RELEVANCE:
            continue
        queries[f"q{index}"] = format_input(task, row["anchor"], row["anchor_images"])
        relevant[f"q{index}"] = {key_to_corpus_id[key]}
    if not queries or len(corpus) < 2:
        return None
    return _retrieval(queries, corpus, relevant, task, batch_size)


def _cross_modal_retrieval(rows: list[Mapping[str, Any]], batch_size: int) -> list[InformationRetrievalEvaluator]:
    images, texts, text_of_key = {}, {}, {}
    pair_keys = []
    for index, row in enumerate(rows):
        key = positive_key(row["positive"], row["positive_images"])
        images[f"i{index}"] = format_input(row["task"], None, row["anchor_images"])
        text_of_key.setdefault(key, f"t{len(text_of_key)}")
        texts[text_of_key[key]] = format_input(row["task"], row["positive"], row["positive_images"])
        pair_keys.append(key)
    # Pictures of the same text (or scenes with the same caption) are all relevant to that text.
    images_of_key: dict[int, set[str]] = {}
    for index, key in enumerate(pair_keys):
        images_of_key.setdefault(key, set()).add(f"i{index}")
    image_to_text = {f"i{index}": {text_of_key[key]} for index, key in enumerate(pair_keys)}
    text_to_image = {text_of_key[key]: images_of_key[key] for key in images_of_key}
    return [
        _retrieval(images, texts, image_to_text, "image_to_text", batch_size),
        _retrieval(texts, images, text_to_image, "text_to_image", batch_size),
    ]


def _retrieval(queries, corpus, relevant, name: str, batch_size: int) -> InformationRetrievalEvaluator:
    return InformationRetrievalEvaluator(
        queries,
        corpus,
        relevant,
        accuracy_at_k=[1, 5],
        precision_recall_at_k=[1],
        mrr_at_k=[10],
        ndcg_at_k=[10],
        map_at_k=[10],
        batch_size=batch_size,
        name=name,
        write_csv=False,
        main_score_function="cosine",
    )
