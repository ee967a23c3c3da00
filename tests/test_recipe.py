from pathlib import Path

import pytest

from st_viomni.recipe import RecipeError, load_recipe, parse_recipe

RECIPES = Path(__file__).parent.parent / "recipes"


def _minimal(**overrides):
    raw = {
        "model": {"base": "tiny", "embedding_dim": 8},
        "data": {"train": [{"mini": 4}]},
        "training": {"output_dir": "out"},
    }
    for section, values in overrides.items():
        raw[section] = values if not isinstance(raw.get(section), dict) else {**raw[section], **values}
    return raw


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "viomni-2b-full.yaml", "viomni-2b-lora.yaml"])
def test_shipped_recipes_are_valid(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.output_dir and recipe.data.train


def test_the_full_recipe_is_the_seed_model():
    recipe = load_recipe(RECIPES / "viomni-2b-full.yaml")
    assert recipe.model.base == "Qwen/Qwen2-VL-2B" and recipe.model.embedding_dim == 1024
    assert recipe.data.proportions == "seed" and recipe.data.streaming
    assert {source.task for source in recipe.data.train} == {"text_pair", "instr", "ocr", "vqa_single", "vqa_multi"}
    assert recipe.loss.gather_across_devices and recipe.loss.cached
    assert load_recipe(RECIPES / "viomni-2b-lora.yaml").lora.r == 64


def test_sources_split_loader_keys_from_adapter_options():
    recipe = parse_recipe(
        _minimal(data={"train": [{"task": "text_pair", "json": "pairs.jsonl", "score_range": [0, 5],
                                  "sentence1_column": "a"}]})
    )
    (source,) = recipe.data.train
    assert source.json == "pairs.jsonl" and source.adapter_kwargs == {"score_range": [0, 5], "sentence1_column": "a"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss": {"temprature": 0.1}}, r"loss\.temprature: unknown key .*closest: temperature"),
        ({"loss": {"temperature": "hot"}}, r"loss\.temperature: expected float"),
        ({"training": {"output_dir": "o", "learning_rat": 1}}, r"training\.learning_rat: unknown key"),
        ({"training": {"num_train_epochs": 1, "output_dir": None}}, r"training\.output_dir: required"),
        ({"data": {"train": [{"task": "caption", "json": "x.json"}]}}, r"data\.train\[0\]\.task: Unknown task 'caption'"),
        ({"data": {"train": [{"task": "ocr", "json": "a", "parquet": "b"}]}}, r"data\.train\[0\]: needs exactly one of"),
        ({"data": {"train": [{"json": "a"}]}}, r"data\.train\[0\]: missing key 'task'"),
        ({"data": {"train": [{"task": "ocr", "json": "a", "question_column": "q"}]}},
         r"data\.train\[0\]\.question_column: unknown key.*ocr adapter accepts"),
        ({"data": {"train": []}}, r"data\.train: needs at least one source"),
        ({"data": {"train": [{"mini": 4}], "proportions": {"ocr": 1, "captions": 1}}}, r"data\.proportions\.captions"),
        ({"loss": {"margins": {"ocr": 0.1, "vqa": 0.2}}}, r"loss\.margins\.vqa: Unknown task"),
        ({"loss": {"cached": True, "mini_batch_num_tokens": 0}}, r"loss\.mini_batch_num_tokens: expected a positive"),
        ({"loss": {"mini_batch_size": 0}}, r"loss\.mini_batch_size: expected a positive"),
        ({"model": {"base": "tiny", "dim": 8}}, r"model\.dim: unknown key"),
        ({"hub": {"private": True}}, r"hub: missing required key"),
        ({"extra": 1}, r"extra: unknown key"),
    ],
)
def test_bad_recipes_name_the_offending_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_minimal(**overrides))


PAIRS = {"task": "text_pair", "json": "pairs.jsonl"}
DIALOGUES = {"task": "vqa_multi", "json": "dialogues.jsonl"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        # A weight for a task no source has would be dropped from the mixture without a word.
        ({"data": {"train": [{"mini": 10, "task": "text_pair"}], "proportions": {"text_pair": 1, "ocr": 3}}},
         r"^data\.proportions\.ocr: weight given but no data\.train source has task ocr \(the sources have "
         r"text_pair\)"),
        ({"data": {"train": [{"mini": 4}], "proportions": {"ocr": 1}}}, r"^data\.proportions: no weight for task\(s\)"),
        ({"data": {"train": [PAIRS], "proportions": {"text_pair": "abc"}}},
         r"^data\.proportions\.text_pair: expected a finite non-negative number, got 'abc'"),
        ({"data": {"train": [PAIRS], "proportions": {"text_pair": -1}}}, r"^data\.proportions\.text_pair: .*got -1"),
        ({"data": {"train": [PAIRS], "proportions": {"text_pair": float("inf")}}}, r"^data\.proportions\.text_pair"),
        ({"data": {"train": [PAIRS], "proportions": {"text_pair": 0}}}, r"^data\.proportions: every weight is 0"),
        ({"loss": {"margins": {"vqa_multi": "x"}}}, r"^loss\.margins\.vqa_multi: expected a finite non-negative"),
        ({"loss": {"margins": {"instr": 0.1}}}, r"^loss\.margins\.instr: task instr has no triplet term"),
        ({"loss": {"temperature": 0}}, r"^loss\.temperature: expected a finite positive number, got 0"),
        ({"loss": {"mse_weight": -1}}, r"^loss\.mse_weight: expected a finite non-negative number"),
        ({"data": {"train": [{"mini": -3}]}}, r"^data\.train\[0\]\.mini: expected a positive number of samples"),
        ({"data": {"train": [{"mini": 0}]}}, r"^data\.train\[0\]\.mini: expected a positive number"),
        ({"data": {"train": [{"mini": 4, "split": "validation"}]}},
         r"^data\.train\[0\]\.split: the mini mixture has the splits train, test, got 'validation'"),
        ({"data": {"train": [{"mini": 4}], "eval": [{"mini": 4, "split": "dev"}]}}, r"^data\.eval\[0\]\.split: "),
        # No adapter reads the mini mixture: the option would be ignored.
        ({"data": {"train": [{"mini": 10, "task": "text_pair", "score_range": [0, 5]}]}},
         r"^data\.train\[0\]\.score_range: adapter options do not apply to a mini source"),
        ({"data": {"train": [{**DIALOGUES, "max_history_turns": "2"}]}},
         r"^data\.train\[0\]\.max_history_turns: expected int or null, got '2' \(a string: write the number"),
        ({"data": {"train": [{**DIALOGUES, "max_history_turns": -1}]}}, r"^data\.train\[0\]\.max_history_turns: .*>="),
        ({"data": {"train": [{**PAIRS, "score_range": [5]}]}},
         r"^data\.train\[0\]\.score_range: expected a list \[float, float\], got \[5\]"),
        ({"data": {"train": [{**PAIRS, "score_range": [5, 0]}]}}, r"^data\.train\[0\]\.score_range: .*high > low"),
        ({"data": {"train": [PAIRS, {**DIALOGUES, "images_column": 5}]}},
         r"^data\.train\[1\]\.images_column: expected str or a list of str, got 5"),
        ({"data": {"train": [{**DIALOGUES, "images_column": []}]}}, r"^data\.train\[0\]\.images_column: .*non-empty"),
        ({"data": {"train": [{**DIALOGUES, "verify_images": "no"}]}}, r"^data\.train\[0\]\.verify_images: expected"),
        ({"data": {"train": [{**PAIRS, "num_proc": 0}]}}, r"^data\.train\[0\]\.num_proc: expected a positive"),
        ({"training": {"per_device_train_batch_size": "16"}},
         r"^training\.per_device_train_batch_size: expected int, got '16' \(a string: write the number without "),
        ({"training": {"bf16": "yes"}}, r"^training\.bf16: expected bool, got 'yes'"),
        ({"data": {"streaming": True}}, r"^training\.max_steps: required with data\.streaming"),
        ({"data": {"shuffle_buffer": 0}}, r"^data\.shuffle_buffer: expected a positive number of samples, got 0"),
        ({"data": {"shuffle_buffer": "1000"}}, r"^data\.shuffle_buffer: expected int, got '1000'"),
        ({"loss": {"gather_across_devices": True}, "training": {"dataloader_drop_last": False}},
         r"^training\.dataloader_drop_last: must be true with loss\.gather_across_devices"),
    ],
)
def test_bad_values_are_refused_at_load_naming_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_minimal(**overrides))


def test_a_yaml_exponent_without_a_dot_is_refused_with_how_to_write_it(tmp_path):
    # PyYAML reads 1e-5 (and 1.0e5) as strings: the optimizer would fail on it only after the model load.
    path = tmp_path / "lr.yaml"
    path.write_text("model: {base: tiny}\ndata: {train: [{mini: 2}]}\ntraining: {output_dir: o, learning_rate: 1e-5}\n")
    with pytest.raises(RecipeError, match=r"^training\.learning_rate: expected float, got '1e-5' \(.*write 1\.0e-5\)$"):
        load_recipe(path)
    path.write_text(path.read_text().replace("1e-5", "1.0e-5"))
    assert load_recipe(path).training["learning_rate"] == 1e-5


def test_good_adapter_options_of_every_kind_are_accepted():
    train = [
        {"task": "ocr", "json": "ocr.jsonl", "images_column": ["page_1", "page_2"], "query_column": None,
         "image_root": "images", "verify_images": False},
        {**DIALOGUES, "max_history_turns": 0, "image_placeholder": None, "num_proc": 2},
        {**PAIRS, "score_range": [0.0, 5]},
    ]
    recipe = parse_recipe(_minimal(data={"train": train, "proportions": {"text_pair": 1, "ocr": 2, "vqa_multi": 0}}))
    assert [source.adapter_kwargs.get("num_proc") for source in recipe.data.train] == [None, 2, None]


def test_missing_section_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="missing section 'training'"):
        parse_recipe({"model": {"base": "tiny"}, "data": {"train": [{"mini": 2}]}})
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {base: tiny\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(broken)
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_the_cached_loss_gets_the_recipes_mini_batching(tiny_model):
    from st_viomni.train import _loss

    recipe = parse_recipe(_minimal(loss={"cached": True, "mini_batch_size": 4, "mini_batch_num_tokens": 512}))
    loss = _loss(tiny_model, recipe)
    assert (type(loss).__name__, loss.mini_batch_size, loss.mini_batch_num_tokens) == ("CachedPrefixRoutedLoss", 4, 512)
