import pytest

from st_viomni import PREFIXES, TASK_NAMES, TASKS, get_task


def test_the_five_tasks_and_their_literal_prefixes():
    assert TASK_NAMES == ("text_pair", "instr", "ocr", "vqa_single", "vqa_multi")
    assert PREFIXES == {
        "text_pair": "<text_pair>",
        "instr": "<instr>",
        "ocr": "<ocr>",
        "vqa_single": "<vqa_single>",
        "vqa_multi": "<vqa_multi>",
    }


def test_loss_settings_follow_the_seed():
    assert TASKS["text_pair"].loss == "scored"
    assert TASKS["instr"].loss == "cosine"
    assert {TASKS[name].loss for name in ("ocr", "vqa_single", "vqa_multi")} == {"triplet"}
    assert all(TASKS[name].margin > 0 for name in ("ocr", "vqa_single", "vqa_multi"))
    assert TASKS["vqa_multi"].margin != TASKS["vqa_single"].margin  # the seed's adjusted multi-turn margin
    assert TASKS["text_pair"].margin is None and TASKS["instr"].margin is None


def test_seed_mixture_sizes_add_up_to_about_eleven_million():
    total = sum(task.seed_samples for task in TASKS.values())
    assert total == 11_200_000
    assert TASKS["text_pair"].seed_samples == 5_600_000
    assert TASKS["vqa_single"].seed_samples + TASKS["vqa_multi"].seed_samples == 2_500_000


def test_unknown_task_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"'caption'.*text_pair, instr, ocr, vqa_single, vqa_multi"):
        get_task("caption")
