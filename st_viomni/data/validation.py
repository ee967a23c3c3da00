"""Row validation for every adapter: raise on the first bad row, or skip bad rows and report them.

``on_error="raise"`` stops at the first bad row with an :class:`InvalidRowError` that names the row index,
the column and the reason. ``on_error="skip"`` drops bad rows and counts them in a :class:`ValidationReport`
(counts per reason plus the first few examples), which is also logged, so a long run never dies halfway on
one bad row.

How the two dataset kinds are validated:

* ``datasets.Dataset``: all rows are checked once, eagerly, when the adapter is called (a ``map`` over the
  rows, which ``datasets`` writes to an Arrow cache, so memory stays bounded and ``num_proc`` works). In skip
  mode a bad row leaves a marker row; the report is computed from the markers and they are filtered out, so
  the report is exact even when ``datasets`` serves the ``map`` from its cache.
* ``datasets.IterableDataset``: rows are checked lazily, as the stream is read; bad rows are dropped on the
  fly and the report fills up while you iterate. (In ``DataLoader`` worker processes each worker updates its
  own copy of the report; the log lines still appear.)

Example:
    ::

        from st_viomni.data import ValidationReport, text_pair_samples

        report = ValidationReport()
        samples = text_pair_samples(rows, score_range=(0, 5), on_error="skip", report=report)
        print(report.summary())
        # 998 of 1000 rows kept, 2 skipped: score_out_of_range 1, empty_text 1
        #   text_pair_samples: row 17, column 'score': score_out_of_range: 5.5 is outside [0, 5]
        #   text_pair_samples: row 412, column 'sentence2': empty_text: text is empty ('')
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Literal

from datasets import Dataset, Features, Image, IterableDataset, List, Value

from .schema import CANONICAL_COLUMNS, CANONICAL_FEATURES, RowProblem

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]

_PROBLEM_COLUMN = "_viomni_problem"


class InvalidRowError(ValueError):
    """A bad row met with ``on_error="raise"``; ``problem`` holds its row index, column and reason."""

    def __init__(self, problem: RowProblem, source: str = ""):
        self.problem = problem
        self.row, self.column, self.reason, self.detail = problem.row, problem.column, problem.reason, problem.detail
        hint = ' (pass on_error="skip" to drop bad rows and get a summary instead)'
        super().__init__(f"{source + ': ' if source else ''}{problem}{hint}")


class ValidationReport:
    """What validation dropped: rows seen, rows skipped, counts per reason and the first examples.

    One report can be shared by several adapters (e.g. all sources of a mixture); ``source`` in each example
    says which adapter saw the row.

    Args:
        max_examples: How many example problems to keep per reason.
    """

    def __init__(self, max_examples: int = 3):
        self.max_examples = max_examples
        self.rows_seen = 0
        self.rows_skipped = 0
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, Any]]] = {}

    @property
    def rows_kept(self) -> int:
        return self.rows_seen - self.rows_skipped

    def record(self, problem: RowProblem | dict[str, Any], source: str = "") -> None:
        """Count one skipped row."""
        entry = problem.to_dict() if isinstance(problem, RowProblem) else dict(problem)
        entry["source"] = source
        reason = entry["reason"]
        self.rows_skipped += 1
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(entry)
        if self.counts[reason] == 1:
            logger.warning("Skipping bad row (first %s): %s", reason, _describe(entry))
        elif _is_power_of_ten(self.rows_skipped):
            logger.warning("Skipped %d bad rows so far: %s", self.rows_skipped, self._counts_text())

    def summary(self) -> str:
        """A few lines: rows kept and skipped, counts per reason, the first examples."""
        lines = [f"{self.rows_kept} of {self.rows_seen} rows kept, {self.rows_skipped} skipped"]
        if self.rows_skipped:
            lines[0] += f": {self._counts_text()}"
        for examples in self.examples.values():
            lines.extend(f"  {_describe(entry)}" for entry in examples)
        return "\n".join(lines)

    def log(self, level: int = logging.WARNING) -> None:
        logger.log(level if self.rows_skipped else logging.INFO, "Validation: %s", self.summary())

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_seen": self.rows_seen,
            "rows_skipped": self.rows_skipped,
            "counts": dict(self.counts),
            "examples": {reason: list(entries) for reason, entries in self.examples.items()},
        }

    def _counts_text(self) -> str:
        return ", ".join(f"{reason} {count}" for reason, count in self.counts.most_common())

    def __repr__(self) -> str:
        counts = dict(self.counts)
        return f"ValidationReport(rows_seen={self.rows_seen}, rows_skipped={self.rows_skipped}, counts={counts})"


def _describe(entry: dict[str, Any]) -> str:
    source = f"{entry['source']}: " if entry.get("source") else ""
    row = f"row {entry['row']}, " if entry.get("row") is not None else ""
    return f"{source}{row}column {entry['column']!r}: {entry['reason']}: {entry['detail']}"


def _is_power_of_ten(number: int) -> bool:
    while number >= 10 and number % 10 == 0:
        number //= 10
    return number == 1


RowToSamples = Callable[[dict[str, Any]], list[dict[str, Any]]]


def apply_rows(
    dataset: Dataset | IterableDataset,
    row_to_samples: RowToSamples,
    *,
    source: str,
    required_columns: Iterable[str],
    on_error: OnError = "raise",
    report: ValidationReport | None = None,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Turn every row of ``dataset`` into zero or more canonical samples, validating as it goes.

    Args:
        dataset: The user's rows.
        row_to_samples: Maps one row (a dict) to a list of canonical samples, or raises :class:`RowProblem`.
            Images in typed image columns arrive undecoded (``{"bytes", "path"}`` dicts).
        source: Name of the adapter, for messages.
        required_columns: Columns the adapter reads; checked up front where the dataset knows its columns.
        on_error: ``"raise"`` or ``"skip"``.
        report: Collects skipped rows in skip mode; a new one is created (and logged) when None.
        num_proc: Worker processes for a ``Dataset``'s ``map``; not supported for ``IterableDataset``.

    Returns:
        A dataset of canonical samples (:data:`CANONICAL_FEATURES`), of the same kind as ``dataset``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(
            f"{source}: expected a datasets.Dataset or IterableDataset, got {type(dataset).__name__} "
            "(wrap lists with Dataset.from_list)"
        )
    if report is None:
        report = ValidationReport()
    if isinstance(dataset, IterableDataset) and dataset.features is None:
        # The columns of an untyped stream are only known after reading its first row.
        dataset = dataset._resolve_features()
    missing = [column for column in required_columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{source}: column(s) {missing} not found; the dataset has {dataset.column_names}")
    dataset = _undecoded_images(dataset)

    if isinstance(dataset, Dataset):
        return _apply_to_dataset(dataset, row_to_samples, source, on_error, report, num_proc)
    if num_proc is not None:
        raise ValueError(f"{source}: num_proc applies to a Dataset; an IterableDataset is read lazily in-process")
    return _apply_to_stream(dataset, row_to_samples, source, on_error, report)


def _undecoded_images(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    # Validation decodes each image itself, once; letting datasets decode it too would double the work, and
    # a decoded image could only be stored again by re-encoding it. {"bytes", "path"} dicts pass through as is.
    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(name, Image(decode=False))
        elif isinstance(feature, List) and isinstance(feature.feature, Image) and feature.feature.decode:
            dataset = dataset.cast_column(name, List(Image(decode=False), length=feature.length))
    return dataset


def _rows(batch: dict[str, list[Any]]) -> Iterable[dict[str, Any]]:
    columns = list(batch)
    return (dict(zip(columns, values)) for values in zip(*(batch[column] for column in columns)))


def _empty_output(with_problem_column: bool) -> dict[str, list[Any]]:
    output: dict[str, list[Any]] = {column: [] for column in CANONICAL_COLUMNS}
    if with_problem_column:
        output[_PROBLEM_COLUMN] = []
    return output


def _map_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    row_to_samples: RowToSamples,
    source: str,
    skip: bool,
) -> dict[str, list[Any]]:
    # Pure (no report): datasets may run it in worker processes or serve its result from cache.
    output = _empty_output(with_problem_column=skip)
    for index, row in zip(indices, _rows(batch)):
        try:
            samples = row_to_samples(row)
        except RowProblem as problem:
            problem.row = index
            if not skip:
                raise InvalidRowError(problem, source) from None
            # A marker row: the caller counts the markers, then filters them out.
            for column in CANONICAL_COLUMNS:
                output[column].append([] if column.endswith("_images") else None)
            output[_PROBLEM_COLUMN].append(json.dumps(problem.to_dict(), ensure_ascii=False))
            continue
        for sample in samples:
            for column in CANONICAL_COLUMNS:
                output[column].append(sample[column])
            if skip:
                output[_PROBLEM_COLUMN].append(None)
    return output


def _apply_to_dataset(
    dataset: Dataset,
    row_to_samples: RowToSamples,
    source: str,
    on_error: OnError,
    report: ValidationReport,
    num_proc: int | None,
) -> Dataset:
    skip = on_error == "skip"
    features = Features({**CANONICAL_FEATURES, _PROBLEM_COLUMN: Value("string")}) if skip else CANONICAL_FEATURES
    samples = dataset.map(
        _map_batch,
        fn_kwargs={"row_to_samples": row_to_samples, "source": source, "skip": skip},
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        num_proc=num_proc,
        desc=f"{source}: validating rows",
    )
    report.rows_seen += len(dataset)
    if not skip:
        return samples
    problems = samples.select_columns([_PROBLEM_COLUMN]).filter(
        lambda values: [value is not None for value in values], input_columns=_PROBLEM_COLUMN, batched=True
    )
    for batch in problems.iter(batch_size=1000):
        for problem in batch[_PROBLEM_COLUMN]:
            report.record(json.loads(problem), source)
    if len(problems):
        samples = samples.filter(
            lambda values: [value is None for value in values], input_columns=_PROBLEM_COLUMN, batched=True
        )
    samples = samples.remove_columns(_PROBLEM_COLUMN)
    report.log()
    return samples


def _apply_to_stream(
    dataset: IterableDataset,
    row_to_samples: RowToSamples,
    source: str,
    on_error: OnError,
    report: ValidationReport,
) -> IterableDataset:
    skip = on_error == "skip"

    def map_and_record(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        # Runs lazily, in-process, while the stream is read: bad rows are recorded and dropped right here.
        output = _empty_output(with_problem_column=False)
        for index, row in zip(indices, _rows(batch)):
            report.rows_seen += 1
            try:
                samples = row_to_samples(row)
            except RowProblem as problem:
                problem.row = index
                if not skip:
                    raise InvalidRowError(problem, source) from None
                report.record(problem, source)
                continue
            for sample in samples:
                for column in CANONICAL_COLUMNS:
                    output[column].append(sample[column])
        return output

    samples = dataset.map(
        map_and_record,
        batched=True,
        # Small batches: a batch of raw rows is held while it is validated.
        batch_size=16,
        with_indices=True,
        remove_columns=dataset.column_names,
    )
    # Untyped map output + cast: datasets then encodes each sample to the canonical features and decodes its
    # images to PIL only when the sample is read.
    return samples.cast(CANONICAL_FEATURES)
