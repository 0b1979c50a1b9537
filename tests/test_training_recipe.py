"""Recipes: the bundled ones load; a broken one gets a message that names the key."""

import json

import pytest

from prosparse.training.cli import main
from prosparse.training.recipe import RecipeError, load_recipe, recipe_from_dict


@pytest.mark.parametrize("name", ["smollm2-135m-cpu", "smollm2-135m-gpu"])
def test_bundled_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.sparsity.stages
    assert recipe.data.debian_packages


def test_overrides_cover_every_type():
    recipe = load_recipe("smollm2-135m-cpu", ["train.lr=3e-5", "train.steps=1000", "model.freeze_embeddings=true",
                                              "sparsity.stages=[[0.001, 600], [0.01, 900]]",
                                              "data.sources=/tmp/a", "run.out_dir=/tmp/x"])
    assert recipe.train.lr == 3e-5 and recipe.train.steps == 1000
    assert recipe.model.freeze_embeddings is True
    assert recipe.sparsity.stages == [[0.001, 600], [0.01, 900]]
    assert recipe.data.sources == ["/tmp/a"]


@pytest.mark.parametrize("data, needle", [
    ({"train": {"stpes": 10}}, "unknown key 'train.stpes'"),
    ({"trian": {"steps": 10}}, "unknown key 'trian'"),
    ({"train": {"steps": "many"}}, "'train.steps' must be an integer"),
    ({"train": {"lr": "fast"}}, "'train.lr' must be a number"),
    ({"model": {"freeze_embeddings": "yes"}}, "'model.freeze_embeddings' must be true or false"),
    ({"model": {"activation": "gelu"}}, "'model.activation' must be one of relu, silu"),
    ({"train": {"steps": 100}, "sparsity": {"stages": [[0.01, 50], [0.02, 40]]}},
     "'sparsity.stages[1]': end steps must increase"),
    ({"train": {"steps": 100}, "sparsity": {"stages": [[0.05, 50], [0.01, 80]]}},
     "'sparsity.stages[1]': peaks must not decrease"),
    ({"train": {"steps": 100}, "sparsity": {"relu_steps": 60, "stages": [[0.01, 50]]}},
     "'sparsity.stages[0]': end steps must increase"),
    ({"train": {"steps": 100}, "sparsity": {"stages": [[0.01, 500]]}}, "after the run's last step"),
    ({"train": {"steps": 100}, "sparsity": {"stages": [[0.01]]}}, "must be [peak λ, end step]"),
])
def test_broken_recipe_names_the_key(data, needle):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data, "broken.yaml")
    assert needle in str(err.value)
    assert "broken.yaml" in str(err.value)


def test_broken_recipe_file_via_cli(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  steps: 100\nsparsity:\n  stages:\n    - [0.05, 50]\n    - [0.01, 80]\n")
    assert main(["train", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "sparsity.stages[1]" in err and "peaks must not decrease" in err


def test_bad_override_and_json_toml_files(tmp_path, capsys):
    assert main(["train", "--recipe", "smollm2-135m-cpu", "--override", "train.nope=1"]) == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err
    (tmp_path / "r.json").write_text(json.dumps({"train": {"steps": 7}}))
    assert load_recipe(str(tmp_path / "r.json")).train.steps == 7
    (tmp_path / "r.toml").write_text("[train]\nsteps = 9\n")
    assert load_recipe(str(tmp_path / "r.toml")).train.steps == 9
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(tmp_path / "bad.yaml"))
