"""Evaluate a viOmni model on canonical samples with sentence-transformers' own evaluators.

:func:`build_evaluator` turns a held-out set of canonical samples (``task, anchor, anchor_images, positive,
positive_images, score``, e.g. ``mini_mixture(n, split="test")``) into one ``SequentialEvaluator``:

* ``<task>`` for every task present: an ``InformationRetrievalEvaluator`` whose queries are the distinct
  rendered anchors and whose corpus is the distinct rendered positives of that task; a query's relevant
  documents are the positives of every sample with that anchor. For ``text_pair`` only pairs scored at least
  0.5 are queries (an unrelated pair has no positive to retrieve), while every pair's second text stays in
  the corpus.
* ``image_to_text`` and ``text_to_image``: the cross-modal pairs of the OCR and VQA samples whose anchor is
  images only (a picture of text and its transcription, a scene and its caption): distinct images → the texts
  paired with them and distinct texts → the images paired with them.
* ``text_pair_similarity``: an ``EmbeddingSimilarityEvaluator`` (Spearman correlation between cosine similarity
  and the gold score).

Equal content is one query or one document, whichever samples it comes from. An anchor that is also a
document of its corpus (a sentence that is another pair's second sentence) is not a query: a copy of itself
would take rank 1 for any model, as in MTEB's ``ignore_identical_ids``; nor is an anchor to which every
document is relevant (a single-document corpus). The similarity needs two different gold scores. An evaluator
left with nothing to measure is left out with a warning naming it, and :func:`build_evaluator` refuses a set
that gives none.

Relevance comes from the samples alone: a document that would answer a query but is not paired with it is a
miss. In ``text_pair`` data that holds several pairs of one meaning (the mini mixture: its test split draws
some sentences' slots more than once), the paraphrase of another pair can outrank the query's own positive,
so ``accuracy@1/text_pair`` understates the model there and ``text_pair_spearman`` is the better measure.

:func:`summarize` reads the headline numbers from the evaluator's result dict: ``accuracy@1`` is the fraction of
queries whose top-ranked document is relevant (sentence-transformers' ``accuracy@1``).

Example:
    ::

        from st_viomni.data import mini_mixture
        from st_viomni.evaluation import build_evaluator, summarize

        evaluator = build_evaluator(mini_mixture(40, split="test"))
        print(summarize(evaluator(model)))
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from sentence_transformers.base.evaluation import SequentialEvaluator
from sentence_transformers.sentence_transformer.evaluation import (
    EmbeddingSimilarityEvaluator,
    InformationRetrievalEvaluator,
)
from sentence_transformers.util import cos_sim

from .formatting import format_input
from .losses.labels import positive_key
from .tasks import TASK_NAMES, get_task

logger = logging.getLogger(__name__)

TEXT_PAIR_RELEVANCE = 0.5
CROSS_MODAL_TASKS = ("ocr", "vqa_single", "vqa_multi")
CROSS_MODAL = ("image_to_text", "text_to_image")


def build_evaluator(samples: Iterable[Mapping[str, Any]], *, batch_size: int = 32) -> SequentialEvaluator:
    """Build the evaluators described in the module docstring from canonical samples.

    Args:
        samples: Canonical samples (a ``datasets.Dataset`` or any iterable of dicts).
        batch_size: Encoding batch size.

    Raises:
        ValueError: No sample gives any evaluator (an empty set, or too few distinct samples per task); the
            message says what each task lacks.
    """
    by_task: dict[str, list[Mapping[str, Any]]] = {name: [] for name in TASK_NAMES}
    for sample in samples:
        by_task[get_task(sample["task"]).name].append(sample)
    inputs = _Inputs()
    candidates = [_task_retrieval(task, rows, inputs) for task, rows in by_task.items() if rows]
    cross_modal = [row for task in CROSS_MODAL_TASKS for row in by_task[task] if _is_image_only_pair(row)]
    if cross_modal:
        candidates.extend(_cross_modal_retrieval(cross_modal, inputs))
    if by_task["text_pair"]:
        candidates.append(_text_pair_similarity(by_task["text_pair"], inputs))
    if not candidates:
        raise ValueError("no evaluation sample: build_evaluator needs canonical samples of at least one task")
    evaluators = [build(batch_size) for _, build, problem in candidates if problem is None]
    missing = [f"{name}: {problem}" for name, _, problem in candidates if problem is not None]
    if not evaluators:
        found = ", ".join(f"{task} {len(rows)}" for task, rows in by_task.items() if rows)
        raise ValueError(f"no evaluator can be built from these samples ({found}): " + "; ".join(missing))
    for name, _, problem in candidates:
        if problem is not None:
            logger.warning(f"evaluation: no {name} evaluator ({problem})")
    return SequentialEvaluator(evaluators, main_score_function=lambda scores: sum(scores) / len(scores))


def summarize(results: Mapping[str, float]) -> dict[str, float]:
    """Headline metrics from a ``build_evaluator`` result: ``accuracy@1/<task>``, ``image_to_text_accuracy@1``,
    ``text_to_image_accuracy@1`` and ``text_pair_spearman`` (only those that were evaluated)."""
    summary = {}
    for name in (*TASK_NAMES, *CROSS_MODAL):
        value = _find(results, f"{name}_cosine_accuracy@1")
        if value is not None:
            summary[f"accuracy@1/{name}" if name in TASK_NAMES else f"{name}_accuracy@1"] = value
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


class _Inputs:
    """Each distinct input rendered once, whichever evaluators and samples hold it (``format_input`` decodes
    its images): ``inputs(task, text, images)`` gives its content key and the rendered input."""

    def __init__(self):
        self._rendered: dict[tuple[str, int], Any] = {}

    def __call__(self, task: str, text: str | None, images) -> tuple[tuple[str, int], Any]:
        # The prefix is part of the input: the same text under two tasks is two inputs.
        key = (task, positive_key(text, images))
        if key not in self._rendered:
            self._rendered[key] = format_input(task, text, images)
        return key, self._rendered[key]


class _Retrieval:
    """Queries and documents of one retrieval, each distinct content once, with their relevance."""

    def __init__(self, name: str):
        self.name = name
        self.queries: dict[Any, Any] = {}
        self.corpus: dict[Any, Any] = {}
        self.relevant: dict[Any, set[Any]] = {}

    def add_document(self, key, document) -> None:
        self.corpus.setdefault(key, document)

    def add_query(self, key, query, document_key) -> None:
        self.queries.setdefault(key, query)
        self.relevant.setdefault(key, set()).add(document_key)

    def candidate(self):
        # A query identical to a document would find itself (see the module docstring), and one to which
        # every document is relevant has nothing to be ranked against: either would score 1 for any model.
        queries = [key for key in self.queries if key not in self.corpus]
        queries = [key for key in queries if len(self.relevant[key]) < len(self.corpus)]
        if not queries:
            return self.name, None, f"nothing to rank: {len(self.queries)} queries, {len(self.corpus)} documents"
        query_id = {key: f"q{index}" for index, key in enumerate(queries)}
        corpus_id = {key: f"d{index}" for index, key in enumerate(self.corpus)}
        return self.name, lambda batch_size: InformationRetrievalEvaluator(
            {query_id[key]: self.queries[key] for key in queries},
            {corpus_id[key]: document for key, document in self.corpus.items()},
            {query_id[key]: {corpus_id[document] for document in self.relevant[key]} for key in queries},
            accuracy_at_k=[1, 5],
            precision_recall_at_k=[1],
            mrr_at_k=[10],
            ndcg_at_k=[10],
            map_at_k=[10],
            batch_size=batch_size,
            name=self.name,
            write_csv=False,
            # Cosine whatever the model's similarity_fn_name: viOmni embeddings are normalised, and summarize
            # reads the cosine keys.
            score_functions={"cosine": cos_sim},
            main_score_function="cosine",
        ), None


def _task_retrieval(task: str, rows: list[Mapping[str, Any]], inputs: _Inputs):
    retrieval = _Retrieval(task)
    for row in rows:
        document_key, document = inputs(task, row["positive"], row["positive_images"])
        retrieval.add_document(document_key, document)
        if task == "text_pair" and float(row["score"]) < TEXT_PAIR_RELEVANCE:
            continue
        query_key, query = inputs(task, row["anchor"], row["anchor_images"])
        retrieval.add_query(query_key, query, document_key)
    return retrieval.candidate()


def _cross_modal_retrieval(rows: list[Mapping[str, Any]], inputs: _Inputs):
    image_to_text, text_to_image = _Retrieval("image_to_text"), _Retrieval("text_to_image")
    for row in rows:
        text_key, text = inputs(row["task"], row["positive"], row["positive_images"])
        images_key, images = inputs(row["task"], None, row["anchor_images"])
        image_to_text.add_document(text_key, text)
        image_to_text.add_query(images_key, images, text_key)
        text_to_image.add_document(images_key, images)
        text_to_image.add_query(text_key, text, images_key)
    return [image_to_text.candidate(), text_to_image.candidate()]


def _text_pair_similarity(pairs: list[Mapping[str, Any]], inputs: _Inputs):
    scores = [float(row["score"]) for row in pairs]
    if len(set(scores)) < 2:
        # Spearman of a constant is undefined (NaN), which would also make the sequential score NaN.
        problem = f"nothing to correlate: {len(pairs)} pairs, {len(set(scores))} distinct gold scores"
        return "text_pair_similarity", None, problem
    return "text_pair_similarity", lambda batch_size: EmbeddingSimilarityEvaluator(
        [inputs("text_pair", row["anchor"], [])[1] for row in pairs],
        [inputs("text_pair", row["positive"], [])[1] for row in pairs],
        scores,
        batch_size=batch_size,
        main_similarity="cosine",
        similarity_fn_names=["cosine"],
        name="text_pair_similarity",
        write_csv=False,
    ), None
