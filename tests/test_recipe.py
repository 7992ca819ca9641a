"""Recipes: every bad one gets one clear message naming the key and the fix."""

from pathlib import Path

import pytest

from lomotune.recipe import Recipe, RecipeError, load_recipe

SHIPPED = sorted((Path(__file__).parents[1] / "lomotune" / "recipes").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def problems(tmp_path, text: str, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text), list(overrides))
    return e.value.problems


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipes_validate(path):
    assert isinstance(load_recipe(path), Recipe)


def test_defaults_and_overrides(tmp_path):
    r = load_recipe(
        write(tmp_path, "training: {max_steps: 10}\n"),
        ["optimizer.lr=3e-5", "data.max_length=256", "optimizer.clip.mode=exact"],
    )
    assert r.optimizer.lr == 3e-5
    assert r.data.max_length == 256
    assert r.optimizer.clip.mode == "exact"
    assert r.model.name == "smollm2-135m" and r.optimizer.name == "lomo"


def test_unknown_key_suggests_the_right_one(tmp_path):
    (p,) = problems(tmp_path, "training: {max_steps: 10}\noptimizer: {lerning_rate: 1.0}\n")
    assert "optimizer.lerning_rate: unknown key" in p
    p2 = problems(tmp_path, "training: {max_stpes: 10}\n")
    assert any("did you mean training.max_steps" in x for x in p2)


def test_all_problems_reported_together(tmp_path):
    ps = problems(
        tmp_path,
        "model: {precision: bf17}\noptimizer: {lr: -1, name: adam}\ntraining: {max_steps: 0, batch_size: two}\n",
    )
    text = "\n".join(ps)
    for key in (
        "model.precision",
        "optimizer.lr",
        "optimizer.name",
        "training.max_steps",
        "training.batch_size",
    ):
        assert key in text
    assert "'bf17' is not allowed" in text
    assert len(ps) == 5


def test_malformed_yaml_names_the_line(tmp_path):
    (p,) = problems(tmp_path, "model:\n  name: x\n bad: [1,\n")
    assert "not valid YAML at line" in p


def test_top_level_must_be_mapping(tmp_path):
    (p,) = problems(tmp_path, "- a\n- b\n")
    assert "top level must be a mapping" in p


def test_missing_file():
    with pytest.raises(RecipeError) as e:
        load_recipe("/nonexistent/recipe.yaml")
    assert "no such file" in str(e.value)


def test_fused_method_refuses_gradient_accumulation_with_the_fix(tmp_path):
    (p,) = problems(
        tmp_path, "optimizer: {name: lomo, gradient_accumulation: 4}\ntraining: {max_steps: 5}\n"
    )
    assert "optimizer.gradient_accumulation" in p and "raise training.batch_size" in p
    # Methods that can accumulate may.
    r = load_recipe(
        write(
            tmp_path,
            "optimizer: {name: adamw, gradient_accumulation: 4}\ntraining: {max_steps: 5}\n",
        )
    )
    assert r.optimizer.gradient_accumulation == 4


def test_steps_or_epochs(tmp_path):
    assert any(
        "set training.max_steps or training.epochs" in p
        for p in problems(tmp_path, "model: {name: x}\n")
    )
    assert any(
        "choose one" in p for p in problems(tmp_path, "training: {max_steps: 3, epochs: 1}\n")
    )


def test_bad_override_syntax(tmp_path):
    (p,) = problems(tmp_path, "training: {max_steps: 3}\n", ["optimizer.lr"])
    assert "key.path=value" in p


def test_paths_resolve_relative_to_the_recipe(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    r = load_recipe(write(tmp_path, "data: {source: data.jsonl}\ntraining: {max_steps: 3}\n"))
    assert r.data.source == str(tmp_path / "data.jsonl")


def test_methods_not_combinable(tmp_path):
    ps = problems(
        tmp_path, "optimizer: {name: mezo, clip: {mode: exact}}\ntraining: {max_steps: 3}\n"
    )
    assert any("mezo estimates one scalar" in p for p in ps)
    ps = problems(tmp_path, "optimizer: {name: adamw, lora: {r: 8}}\ntraining: {max_steps: 3}\n")
    assert any("optimizer.lora" in p for p in ps)
