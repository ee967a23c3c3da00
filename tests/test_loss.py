"""PrefixRoutedLoss on given embeddings: hand-computed values for every task, masking, hard negatives, bad input.

Most cases use 2-d unit vectors at chosen angles and temperature 1, so that every cosine and every InfoNCE term can
be written down by hand; ``reference_losses`` spells the formula of the issue out in plain Python loops, as an
independent check of the vectorised implementation on larger random batches.
"""

from __future__ import annotations

import math

import pytest
import torch

from st_viomni.losses import DEFAULT_MARGINS, PrefixRoutedLoss
from st_viomni.tasks import TASKS

NAN = float("nan")


def make_loss(**kwargs) -> PrefixRoutedLoss:
    # compute_loss_from_embeddings never touches the model.
    return PrefixRoutedLoss(torch.nn.Module(), **kwargs)


def vectors(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# a1 = (1, 0), a2 = (0, 1); p1 = (0.6, 0.8), p2 = (0.8, 0.6): c11 = c22 = 0.6 and c12 = c21 = 0.8.
ANCHORS = vectors((1.0, 0.0), (0.0, 1.0))
POSITIVES = vectors((0.6, 0.8), (0.8, 0.6))
# With temperature 1: row_i = col_i = -log(e^0.6 / (e^0.6 + e^0.8)) = log(1 + e^0.2).
INFO = math.log(1 + math.exp(0.2))  # 0.798139...


def test_default_margins_come_from_the_task_registry():
    assert DEFAULT_MARGINS == {"ocr": 0.2, "vqa_single": 0.2, "vqa_multi": 0.3}
    assert make_loss().margins == {name: task.margin for name, task in TASKS.items() if task.loss == "triplet"}
    assert make_loss(margins={"vqa_multi": 0.5}).margins["vqa_multi"] == 0.5
    with pytest.raises(ValueError, match="instr"):
        make_loss(margins={"instr": 0.1})


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("instr", INFO + (1 - 0.6)),  # info + w_cos (1 - c_ii)
        ("ocr", INFO + (0.2 - 0.6 + 0.8)),  # info + hinge(m=0.2, hardest negative 0.8)
        ("vqa_single", INFO + (0.2 - 0.6 + 0.8)),
        ("vqa_multi", INFO + (0.3 - 0.6 + 0.8)),  # the multi-turn margin is 0.3
    ],
)
def test_each_task_by_hand(task, expected):
    loss = make_loss(temperature=1.0)
    per_sample = loss.per_sample_losses(ANCHORS, POSITIVES, [task, task])
    assert per_sample.tolist() == pytest.approx([expected, expected], rel=1e-12)
    assert loss.compute_loss_from_embeddings(ANCHORS, POSITIVES, [task, task]).item() == pytest.approx(expected)


def test_text_pair_by_hand():
    loss = make_loss(temperature=1.0)
    per_sample = loss.per_sample_losses(ANCHORS, POSITIVES, ["text_pair", "text_pair"], torch.tensor([0.5, 1.0]))
    # s * info + (c_ii - s)^2
    assert per_sample.tolist() == pytest.approx([0.5 * INFO + (0.6 - 0.5) ** 2, 1.0 * INFO + (0.6 - 1.0) ** 2])


def test_text_pair_scored_zero_contributes_only_its_mse_term():
    loss = make_loss(temperature=1.0)
    per_sample = loss.per_sample_losses(ANCHORS, POSITIVES, ["text_pair", "ocr"], torch.tensor([0.0, NAN]))
    assert per_sample[0].item() == pytest.approx(0.6**2, rel=1e-12)
    # Its positive still serves as a negative for the other row.
    assert per_sample[1].item() == pytest.approx(INFO + (0.2 - 0.6 + 0.8))


def test_weights_and_temperature_scale_their_terms():
    loss = make_loss(temperature=0.5, mse_weight=2.0, cosine_weight=3.0, triplet_weight=0.5)
    info = math.log(1 + math.exp(0.2 / 0.5))  # S = c / 0.5
    per_sample = loss.per_sample_losses(
        ANCHORS, POSITIVES, ["text_pair", "instr"], torch.tensor([0.25, NAN])
    )
    assert per_sample.tolist() == pytest.approx([0.25 * info + 2.0 * (0.6 - 0.25) ** 2, info + 3.0 * 0.4])
    triplet = loss.per_sample_losses(ANCHORS, POSITIVES, ["vqa_multi", "vqa_multi"])
    assert triplet.tolist() == pytest.approx([info + 0.5 * 0.5] * 2)


def test_hinge_is_zero_once_the_margin_is_met():
    # c11 = 1, c12 = 0: margin 0.2 - 1 + 0 < 0.
    anchors, positives = vectors((1.0, 0.0), (0.0, 1.0)), vectors((1.0, 0.0), (0.0, 1.0))
    per_sample = make_loss(temperature=1.0).per_sample_losses(anchors, positives, ["ocr", "ocr"])
    assert per_sample.tolist() == pytest.approx([math.log(1 + math.exp(-1.0))] * 2)


def test_single_sample_has_no_negative_so_info_and_hinge_are_zero():
    per_sample = make_loss().per_sample_losses(ANCHORS[:1], POSITIVES[:1], ["vqa_multi"])
    assert per_sample.item() == 0.0


def test_identical_positives_are_not_negatives():
    # Both answers are "đỏ": with masking, neither row has a negative left.
    loss = make_loss(temperature=1.0)
    same_answer = vectors((0.6, 0.8), (0.6, 0.8))
    masked = loss.per_sample_losses(ANCHORS, same_answer, ["instr", "ocr"], positive_ids=["đỏ", "đỏ"])
    # instr: 1 - c_ii only; ocr: nothing at all.
    assert masked.tolist() == pytest.approx([1 - 0.6, 0.0], abs=1e-12)
    unmasked = loss.per_sample_losses(ANCHORS, same_answer, ["instr", "ocr"])
    assert unmasked[0].item() > masked[0].item() and unmasked[1].item() > 0


def test_identical_positive_masking_leaves_other_negatives():
    # Rows 0 and 1 share their positive; row 2's positive stays a negative of both.
    anchors = vectors((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0))
    positives = vectors((0.6, 0.8), (0.6, 0.8), (-0.8, 0.6))
    per_sample = make_loss(temperature=1.0).per_sample_losses(
        anchors, positives, ["ocr", "ocr", "ocr"], positive_ids=[7, 7, 8]
    )
    # Row 0: c00 = 0.6, its only negative p2 has c02 = -0.8; column: anchors a0 (0.6) and a2 (-0.6) for p0.
    row = math.log(math.exp(0.6) + math.exp(-0.8)) - 0.6
    col = math.log(math.exp(0.6) + math.exp(-0.6)) - 0.6
    hinge = max(0.0, 0.2 - 0.6 - 0.8)
    assert per_sample[0].item() == pytest.approx((row + col) / 2 + hinge)
    assert per_sample.tolist() == pytest.approx(reference_losses(anchors, positives, ["ocr"] * 3, ids=[7, 7, 8]))


def test_positive_ids_may_be_any_hashable():
    anchors, positives = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    loss = make_loss()
    by_string = loss.per_sample_losses(anchors, positives, ["ocr"] * 4, positive_ids=["a", ("b", 1), "a", None])
    by_int = loss.per_sample_losses(anchors, positives, ["ocr"] * 4, positive_ids=[0, 1, 0, 2])
    assert torch.equal(by_string, by_int)


def test_hard_negative_columns_join_infonce_rows_and_the_hardest_negative():
    loss = make_loss(temperature=1.0)
    anchor, positive, hard_negative = vectors((1.0, 0.0)), vectors((0.6, 0.8)), vectors((0.8, 0.6))
    per_sample = loss.per_sample_losses(anchor, positive, ["ocr"], negatives=[hard_negative])
    # Row: {p, n} -> log(1 + e^0.2); column: only the sample's own anchor -> 0; hinge 0.2 - 0.6 + 0.8.
    assert per_sample.item() == pytest.approx(INFO / 2 + 0.4)
    assert loss.per_sample_losses(anchor, positive, ["ocr"]).item() == 0.0


def test_every_rows_hard_negatives_are_negatives_of_every_sample():
    torch.manual_seed(0)
    anchors, positives = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    negatives = [torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]
    tasks = ["vqa_single", "instr", "vqa_multi"]
    per_sample = make_loss(temperature=0.1).per_sample_losses(anchors, positives, tasks, negatives=negatives)
    expected = reference_losses(anchors, positives, tasks, negatives=negatives, temperature=0.1)
    assert per_sample.tolist() == pytest.approx(expected, rel=1e-10)


def test_mixed_batch_matches_the_formula_and_components_add_up():
    torch.manual_seed(1)
    tasks = ["text_pair", "ocr", "instr", "vqa_multi", "text_pair", "vqa_single", "ocr", "vqa_multi"]
    scores = torch.tensor([0.9, NAN, NAN, NAN, 0.0, NAN, NAN, NAN])
    ids = [0, 1, 2, 3, 4, 5, 1, 6]  # rows 1 and 6 share an answer
    anchors, positives = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    positives[6] = positives[1]
    loss = make_loss(mse_weight=0.7, cosine_weight=1.3, triplet_weight=2.0, margins={"ocr": 0.25})
    per_sample = loss.per_sample_losses(anchors, positives, tasks, scores, ids)
    expected = reference_losses(
        anchors, positives, tasks, scores.tolist(), ids, temperature=0.05, mse_weight=0.7, cosine_weight=1.3,
        triplet_weight=2.0, margins={**DEFAULT_MARGINS, "ocr": 0.25},
    )
    assert per_sample.tolist() == pytest.approx(expected, rel=1e-10)
    batch_loss = loss.compute_loss_from_embeddings(anchors, positives, tasks, scores, ids)
    assert batch_loss.item() == pytest.approx(sum(expected) / 8, rel=1e-10)

    components = loss.task_components(per_sample, tasks)
    assert set(components) == {f"loss_{name}" for name in TASKS}
    assert sum(components.values()).item() == pytest.approx(batch_loss.item(), rel=1e-12)
    # Each component is the task's share: the sum of its rows' losses over the batch size.
    assert components["loss_ocr"].item() == pytest.approx((expected[1] + expected[6]) / 8)


def test_infonce_part_is_sentence_transformers_symmetric_mnrl():
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    torch.manual_seed(2)
    anchors, positives, negatives = (torch.randn(5, 8, dtype=torch.float64) for _ in range(3))
    # instr with cosine_weight 0 leaves info_i alone.
    ours = make_loss(temperature=0.05, cosine_weight=0.0).compute_loss_from_embeddings(
        anchors, positives, ["instr"] * 5, negatives=[negatives]
    )
    symmetric_mnrl = MultipleNegativesRankingLoss(
        torch.nn.Module(), scale=20.0, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"
    )
    theirs = symmetric_mnrl.compute_loss_from_embeddings([anchors, positives, negatives], None)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)


def test_batch_without_some_tasks_works():
    anchors, positives = torch.randn(3, 4), torch.randn(3, 4)
    loss = make_loss()
    per_sample = loss.per_sample_losses(anchors, positives, ["instr", "instr", "ocr"])
    components = loss.task_components(per_sample, ["instr", "instr", "ocr"])
    assert components["loss_text_pair"].item() == 0.0 and components["loss_vqa_multi"].item() == 0.0
    assert torch.isfinite(per_sample).all()


def test_gradients_flow_to_anchors_positives_and_negatives():
    anchors, positives, negatives = (torch.randn(3, 4, requires_grad=True) for _ in range(3))
    loss = make_loss().compute_loss_from_embeddings(
        anchors, positives, ["text_pair", "instr", "ocr"], torch.tensor([0.3, NAN, NAN]), negatives=[negatives]
    )
    loss.backward()
    for tensor in (anchors, positives, negatives):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("tasks", "scores", "message"),
    [
        (["instr", "ocr", "caption"], None, r"row 2: Unknown task 'caption'"),
        (["instr", "text_pair"], None, r"row 1: task 'text_pair' needs a gold score"),
        (["instr", "text_pair"], [NAN, NAN], r"row 1: task 'text_pair' needs a gold score .*NaN"),
        (["text_pair", "text_pair"], [0.5, 1.5], r"row 1: task 'text_pair' needs a gold score in \[0, 1\], got 1.5"),
        (["text_pair", "text_pair"], [-0.1, 0.5], r"row 0: task 'text_pair' needs a gold score in \[0, 1\], got -0.1"),
        (["text_pair", "ocr"], [0.5, 0.5], r"row 1: task 'ocr' takes no score"),
    ],
)
def test_bad_rows_raise_naming_the_row(tasks, scores, message):
    anchors, positives = torch.randn(len(tasks), 4), torch.randn(len(tasks), 4)
    with pytest.raises(ValueError, match=message):
        make_loss().compute_loss_from_embeddings(anchors, positives, tasks, scores)


def test_mismatched_shapes_raise():
    loss = make_loss()
    with pytest.raises(ValueError, match="positives"):
        loss.compute_loss_from_embeddings(torch.randn(3, 4), torch.randn(2, 4), ["instr"] * 3)
    with pytest.raises(ValueError, match="3 task names"):
        loss.compute_loss_from_embeddings(torch.randn(3, 4), torch.randn(3, 4), ["instr"] * 2)
    with pytest.raises(ValueError, match="positive ids"):
        loss.compute_loss_from_embeddings(torch.randn(3, 4), torch.randn(3, 4), ["instr"] * 3, positive_ids=[1])


def test_invalid_hyperparameters_raise():
    with pytest.raises(ValueError, match="temperature"):
        make_loss(temperature=0.0)
    with pytest.raises(ValueError, match="triplet_weight"):
        make_loss(triplet_weight=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": math.inf}, r"temperature must be a finite positive number, got inf"),
        ({"temperature": NAN}, r"temperature must be a finite positive number, got nan"),
        ({"temperature": "0.05"}, r"temperature must be a finite positive number, got '0.05'"),
        ({"mse_weight": math.inf}, r"mse_weight must be a finite non-negative number, got inf"),
        ({"cosine_weight": NAN}, r"cosine_weight must be a finite non-negative number, got nan"),
        ({"triplet_weight": "1"}, r"triplet_weight must be a finite non-negative number, got '1'"),
        ({"margins": {"ocr": NAN}}, r"margins\['ocr'\] must be a finite non-negative number, got nan"),
        ({"margins": {"vqa_single": math.inf}}, r"margins\['vqa_single'\] must be .*, got inf"),
        ({"margins": {"vqa_multi": -0.1}}, r"margins\['vqa_multi'\] must be .*, got -0.1"),
        # Strings are refused rather than converted, as the recipe loader refuses them for the other values.
        ({"margins": {"ocr": "0.2"}}, r"margins\['ocr'\] must be a finite non-negative number, got '0.2'"),
        ({"margins": {"ocr": True}}, r"margins\['ocr'\] must be a finite non-negative number, got True"),
    ],
)
def test_non_finite_or_non_numeric_hyperparameters_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_loss(**kwargs)


def test_zero_weights_and_margins_are_allowed():
    loss = make_loss(mse_weight=0, cosine_weight=0.0, triplet_weight=0, margins={"ocr": 0, "vqa_multi": 0.0})
    assert loss.margins["ocr"] == 0.0 and isinstance(loss.margins["ocr"], float)
    assert (loss.mse_weight, loss.cosine_weight, loss.triplet_weight) == (0.0, 0.0, 0.0)


def reference_losses(
    anchors,
    positives,
    tasks,
    scores=None,
    ids=None,
    negatives=(),
    temperature=1.0,
    mse_weight=1.0,
    cosine_weight=1.0,
    triplet_weight=1.0,
    margins=None,
) -> list[float]:
    """The issue's formula, one sample at a time, in plain Python floats."""
    margins = margins or DEFAULT_MARGINS
    size = len(tasks)
    scores = scores or [NAN] * size

    def cos(u, v):
        u, v = u.tolist(), v.tolist()
        dot = sum(x * y for x, y in zip(u, v))
        return dot / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    hard_negatives = [column[k] for column in negatives for k in range(size)]
    results = []
    for i in range(size):
        c_ii = cos(anchors[i], positives[i])
        negative_js = [j for j in range(size) if j != i and (ids is None or ids[j] != ids[i])]
        row_negatives = [cos(anchors[i], positives[j]) for j in negative_js]
        row_negatives += [cos(anchors[i], negative) for negative in hard_negatives]
        col_negatives = [cos(anchors[j], positives[i]) for j in negative_js]
        row = -c_ii / temperature + math.log(sum(math.exp(c / temperature) for c in [c_ii, *row_negatives]))
        col = -c_ii / temperature + math.log(sum(math.exp(c / temperature) for c in [c_ii, *col_negatives]))
        info = (row + col) / 2
        kind = TASKS[tasks[i]].loss
        if kind == "scored":
            results.append(scores[i] * info + mse_weight * (c_ii - scores[i]) ** 2)
        elif kind == "cosine":
            results.append(info + cosine_weight * (1 - c_ii))
        else:
            hinge = max(0.0, margins[tasks[i]] - c_ii + max(row_negatives)) if row_negatives else 0.0
            results.append(info + triplet_weight * hinge)
    return results
