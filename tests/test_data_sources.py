import json

from PIL import Image

from st_viomni.data import ValidationReport
from st_viomni.data.sources import load_samples_by_task
from st_viomni.recipe import SourceRecipe


def test_json_parquet_and_mini_sources_become_canonical_samples_per_task(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(
        "\n".join(json.dumps({"a": f"câu {i}", "b": f"sentence {i}", "s": i % 6}) for i in range(6)), encoding="utf-8"
    )
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    import datasets

    datasets.Dataset.from_list(
        [{"img": "red.png", "q": "Màu gì?", "ans": "đỏ"}, {"img": "missing.png", "q": "Màu gì?", "ans": "xanh"}]
    ).to_parquet(str(tmp_path / "vqa.parquet"))
    sources = [
        SourceRecipe(task="text_pair", json=str(tmp_path / "pairs.jsonl"),
                     adapter_kwargs={"sentence1_column": "a", "sentence2_column": "b", "score_column": "s",
                                     "score_range": [0, 5]}),
        SourceRecipe(task="vqa_single", parquet=str(tmp_path / "vqa.parquet"),
                     adapter_kwargs={"images_column": "img", "question_column": "q", "answer_column": "ans",
                                     "image_root": str(tmp_path)}),
        SourceRecipe(mini=3, task="instr"),
    ]
    report = ValidationReport()
    samples = load_samples_by_task(sources, on_error="skip", report=report)
    assert sorted(samples) == ["instr", "text_pair", "vqa_single"]
    assert sorted(samples["text_pair"]["score"]) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert samples["vqa_single"]["positive"] == ["đỏ"] and report.rows_skipped == 1  # the missing image
    assert len(samples["instr"]) == 3

    streamed = load_samples_by_task(sources, streaming=True, on_error="skip")
    assert sum(1 for _ in streamed["text_pair"]) == 6
    assert [row["positive"] for row in streamed["vqa_single"]] == ["đỏ"]
