"""PrefixRoutedLoss inside SentenceTransformerTrainer: a mixed-task dataset trains and each task is logged."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

from st_viomni import format_input
from st_viomni.losses import CachedPrefixRoutedLoss, PrefixRoutedLoss, TaskLossLogger, make_label
from st_viomni.tasks import TASK_NAMES

# A column cannot hold both strings and {"image", "text"} dicts, so text-only anchors are dicts with no image
# (they render the same tokens as the bare string), and the image lists are typed as datasets.Image().
FEATURES = Features(
    {
        "anchor": {"image": List(Image()), "text": Value("string")},
        "positive": Value("string"),
        "label": List(Value("float32")),
    }
)


def mixed_task_dataset(without: str | None = None) -> Dataset:
    red = PILImage.new("RGB", (56, 56), (220, 30, 30))
    blue = PILImage.new("RGB", (56, 84), (30, 30, 220))
    samples = [
        ("text_pair", "Con mèo ngồi trên thảm.", [], "Một con mèo nằm trên tấm thảm.", 0.9),
        ("text_pair", "Hôm nay trời đẹp.", [], "Giá chiếc áo là hai trăm nghìn.", 0.0),
        ("instr", "Dịch sang tiếng Anh: xin chào", [], "hello", None),
        ("instr", "Viết một câu về trường học.", [], "Học sinh đến trường lúc bảy giờ.", None),
        ("ocr", "Biển báo ghi gì?", [blue], "dừng lại", None),
        ("vqa_single", "Hình vuông màu gì?", [red], "đỏ", None),
        ("vqa_single", "What colour is the square?", [blue], "blue", None),
        ("vqa_multi", "Còn hình thứ hai?", [red, blue], "đỏ", None),  # the same answer as a vqa_single row
    ]
    rows = []
    for task, anchor, images, positive, score in samples:
        if task == without:
            continue
        rendered = format_input(task, anchor, images)
        rows.append(
            {
                "anchor": rendered if isinstance(rendered, dict) else {"image": [], "text": rendered},
                "positive": format_input(task, positive),
                "label": make_label(task, score, positive),
            }
        )
    return Dataset.from_list(rows, features=FEATURES)


def train(model, loss, tmp_path, max_steps: int, logging_steps: int = 1, dataset: Dataset | None = None):
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,  # the whole dataset: every step sees the same mixed batch
        max_steps=max_steps,
        learning_rate=2e-3,
        warmup_steps=0,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    dataset = mixed_task_dataset() if dataset is None else dataset
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    TaskLossLogger.attach(trainer)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


ROWS_PER_TASK = {"text_pair": 2, "instr": 2, "ocr": 1, "vqa_single": 2, "vqa_multi": 1}  # of mixed_task_dataset()


def test_rendered_text_only_dict_matches_the_string(tiny_model):
    # Why the dataset may wrap text-only anchors in {"image": [], "text": ...}.
    text = format_input("instr", "xin chào")
    as_string = tiny_model.preprocess([text])["input_ids"]
    as_dict = tiny_model.preprocess([{"image": [], "text": text}])["input_ids"]
    assert torch.equal(as_string, as_dict)


def test_trainer_loss_decreases_and_logs_every_task(tiny_model, tmp_path):
    logs = train(tiny_model, PrefixRoutedLoss(tiny_model, temperature=0.1), tmp_path, max_steps=6)
    losses = [entry["loss"] for entry in logs]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    for entry in logs:
        components = [entry[f"loss_{task}"] for task in TASK_NAMES]
        # The components are each task's share of the loss: they add up to it (both are rounded to 4 decimals).
        assert sum(components) == pytest.approx(entry["loss"], abs=1e-3)
        assert all(component >= 0 for component in components)
    assert all(logs[0][f"loss_{task}"] > 0 for task in TASK_NAMES)


def test_trainer_with_the_cached_loss_logs_every_task(tiny_model, tmp_path):
    logs = train(tiny_model, CachedPrefixRoutedLoss(tiny_model, temperature=0.1, mini_batch_size=3), tmp_path, 2)
    assert len(logs) == 2
    for entry in logs:
        assert sum(entry[f"loss_{task}"] for task in TASK_NAMES) == pytest.approx(entry["loss"], abs=1e-3)


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_the_logs_hold_each_tasks_mean_loss(tiny_model, tmp_path, cached):
    loss = (
        CachedPrefixRoutedLoss(tiny_model, temperature=0.1, mini_batch_size=3)
        if cached
        else PrefixRoutedLoss(tiny_model, temperature=0.1)
    )
    logs = train(tiny_model, loss, tmp_path, max_steps=4, logging_steps=2)
    assert len(logs) == 2
    for entry in logs:
        for task in TASK_NAMES:
            # Every step is the whole dataset, so over any window the task's mean is its share of the batch
            # loss times batch size / rows of the task (logged values are rounded to 4 decimals).
            expected = entry[f"loss_{task}"] * 8 / ROWS_PER_TASK[task]
            assert entry[f"mean_loss_{task}"] == pytest.approx(expected, abs=5e-4)
            assert entry[f"mean_loss_{task}"] > 0
        # The means are not weighted by the mixture: the mixture-weighted mean of the means is the loss.
        weighted = sum(entry[f"mean_loss_{task}"] * ROWS_PER_TASK[task] / 8 for task in TASK_NAMES)
        assert weighted == pytest.approx(entry["loss"], abs=1e-3)


def test_a_task_absent_from_the_window_gets_no_mean(tiny_model, tmp_path):
    logs = train(tiny_model, PrefixRoutedLoss(tiny_model), tmp_path, 1, dataset=mixed_task_dataset("vqa_multi"))
    assert "mean_loss_vqa_multi" not in logs[0] and logs[0]["loss_vqa_multi"] == 0
    assert {f"mean_loss_{task}" for task in TASK_NAMES if task != "vqa_multi"} <= set(logs[0])


def test_evaluation_logs_its_own_task_means(tiny_model, tmp_path):
    loss = PrefixRoutedLoss(tiny_model)
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = SentenceTransformerTrainer(model=tiny_model, args=args, eval_dataset=mixed_task_dataset(), loss=loss)
    TaskLossLogger.attach(trainer)
    metrics = trainer.evaluate()
    logged = trainer.state.log_history[-1]
    assert {f"eval_mean_loss_{task}" for task in TASK_NAMES} <= set(logged)
    # A separate accumulator: evaluation neither reads nor leaves training sums.
    assert loss.take_task_loss_totals("train") is None and loss.take_task_loss_totals("eval") is None
    assert metrics["eval_loss"] == pytest.approx(
        sum(logged[f"eval_mean_loss_{task}"] * ROWS_PER_TASK[task] / 8 for task in TASK_NAMES), abs=1e-3
    )


def test_the_logger_rejects_a_loss_without_task_totals(tiny_model):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    with pytest.raises(TypeError, match="MultipleNegativesRankingLoss"):
        TaskLossLogger(MultipleNegativesRankingLoss(tiny_model))
