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


@pytest.mark.parametrize(
    "method, lr",
    [("lomo", 1e-2), ("adalomo", 1e-3), ("mezo", 1e-6), ("adamw", 2e-5), ("qlora-sgd", 0.3)],
)
def test_each_method_has_its_own_default_lr(tmp_path, method, lr):
    recipe = load_recipe(
        write(tmp_path, "training: {max_steps: 1}\n"), [f"optimizer.name={method}"]
    )
    assert recipe.optimizer.lr == lr
    assert load_recipe(None, ["training.max_steps=1", "optimizer.lr=0.5"]).optimizer.lr == 0.5


@pytest.mark.parametrize(
    "method, key, value",
    [
        ("adalomo", "betas", "[0.8, 0.9]"),  # AdaLomo has no betas: it used to ignore them
        ("lomo", "eps", "1e-6"),
        ("adamw", "clip_threshold", "2.0"),
        ("lomo", "zo_eps", "1e-2"),
        ("adamw", "stochastic_rounding", "false"),
    ],
)
def test_a_key_the_method_does_not_read_is_refused(tmp_path, method, key, value):
    found = problems(
        tmp_path,
        "training: {max_steps: 1}\n",
        [f"optimizer.name={method}", f"optimizer.{key}={value}"],
    )
    assert any(p.startswith(f"optimizer.{key}: {method} does not use it") for p in found), found


def test_a_saved_resolved_recipe_loads_again(tmp_path):
    from lomotune.recipe import recipe_to_yaml

    for method in ("lomo", "adalomo", "mezo", "adamw"):
        recipe = load_recipe(None, ["training.max_steps=1", f"optimizer.name={method}"])
        again = load_recipe(write(tmp_path, recipe_to_yaml(recipe)))
        assert again == recipe


@pytest.mark.parametrize("method", ["adamw", "sgd", "adam-mini"])
def test_baselines_refuse_pure_fp16(tmp_path, method):
    found = problems(
        tmp_path, "training: {max_steps: 1}\n", [f"optimizer.name={method}", "model.precision=fp16"]
    )
    assert any("model.precision: bf16, fp32 or auto" in p for p in found), found


def test_seeds_up_to_64_bits(tmp_path):
    assert load_recipe(None, ["training.max_steps=1", f"training.seed={2**64 - 1}"])
    found = problems(tmp_path, "training: {max_steps: 1, seed: -1}\n")
    assert any(p.startswith("training.seed") for p in found)


def test_the_readme_recipe_listing_is_the_schema(tmp_path):
    """Every value the README shows as a default is the schema's default."""
    import re

    import yaml

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"A recipe \(the main keys.*?```yaml\n(.*?)```", readme, re.S).group(1)
    shown = yaml.safe_load(block)
    defaults = Recipe(training={"max_steps": 1}).model_dump(mode="json")
    defaults["optimizer"]["lr"] = None  # per method: the README says so
    defaults["training"]["max_steps"] = None  # required: the README says so

    def compare(shown_part, default_part, path):
        for key, value in shown_part.items():
            assert key in default_part, f"{path}{key} is not a recipe key"
            if isinstance(value, dict):
                compare(value, default_part[key], f"{path}{key}.")
            else:
                assert value == default_part[key], f"{path}{key}: README {value!r}"

    compare(shown, defaults, "")


def test_the_readme_lr_table_is_the_registry():
    """The README's per-method table shows each method's default and usual range as the
    registry holds them (the numbers a user reads before choosing an lr)."""
    import re

    from lomotune import methods

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("| method | default lr | usual range | from |") :]
    rows = re.findall(r"^\| (`[^|]+) \| ([0-9.e-]+)[^|]* \| ([0-9.e-]+) \.\. ([0-9.e-]+) \|",
                      table.split("\n\n")[0], re.M)  # fmt: skip
    seen = set()
    for names, lr, low, high in rows:
        for name in re.findall(r"`([a-z-]+)`", names):
            method = methods.method(name)
            assert (method.lr, method.usual_lr) == (float(lr), (float(low), float(high))), name
            seen.add(name)
    assert seen == set(methods.NAMES)
