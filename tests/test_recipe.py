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
        ({"loss": {"margins": {"instr": 0.1, "vqa": 0.2}}}, r"loss\.margins\.vqa: Unknown task"),
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
