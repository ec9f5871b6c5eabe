import pytest

from quantsink.config import available_recipes, load_recipe
from quantsink.errors import QuantsinkError


def test_shipped_recipes_load():
    names = available_recipes()
    assert {"int4-sink", "kv-int4-sink", "kv-int2-sink", "kv-int4", "kv-int2"} <= set(names)
    for name in names:
        assert load_recipe(name).name == name


@pytest.mark.parametrize("doc, fragment", [
    ({"kv_cache": {"key_bits": 5}}, "allowed: [2, 4, 8]"),
    ({"kv_cache": {"key_group_size": 0}}, "must be in 1..1024"),
    ({"kv_cache": {"window": 10, "key_group_size": 64}}, "shorter than one key group"),
    ({"weights": {"bits": 5}}, "allowed: [4, 8]"),
    ({"weights": {"group_size": 0}}, "allowed: [32, 64, 128]"),
    ({"weights": {"bitz": 4}}, "unknown key(s) ['bitz']"),
    ({"weights": {"scale_grid": 0}}, "allowed: an integer 2..1000"),
    ({"weights": {"scale_search": "yes"}}, "scale_search"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"version": 2}, "allowed: 1"),
    ({"kv_cache": {"key_bits": "4"}}, "expected int"),
])
def test_bad_recipes_name_the_problem(doc, fragment):
    with pytest.raises(QuantsinkError) as err:
        load_recipe(doc)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_recipe_lists_available():
    with pytest.raises(QuantsinkError, match="available: .*int4-sink"):
        load_recipe("int3-magic")


def test_recipe_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: mine\nkv_cache:\n  key_bits: 2\n  num_sinks: 2\n")
    recipe = load_recipe(str(path))
    assert recipe.name == "mine" and recipe.kv_cache.key_bits == 2 and recipe.weights is None
