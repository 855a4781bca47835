"""qcompile.recipe: named recipes as data, validation errors that say what to write."""

import pytest

from qcompile.core.quantizer import QuantSpec
from qcompile.passes.sites import SiteKind
from qcompile.recipe import RECIPES, Recipe, SiteSpecs, get_recipe, recipe_from_dict, recipe_to_dict


def test_named_recipes():
    assert list(RECIPES) == ["int8", "fp8", "nvfp4", "mxfp4", "mxfp8", "mxfp4_ocp", "mxfp8_ocp",
                             "int4", "w4a8"]
    int8 = get_recipe("INT8")
    assert int8.linear.weight == QuantSpec("int8", axis=0, dynamic=True)
    assert not int8.linear.input.dynamic and int8.quantize_matmul
    assert get_recipe("nvfp4").linear.input.format == "nvfp4" and not get_recipe("nvfp4").linear.input.dynamic
    assert get_recipe("mxfp4").linear.input.dynamic  # MX scales are always dynamic
    ocp = get_recipe("mxfp8_ocp").linear
    assert ocp.weight.format == ocp.input.format == "mxfp8_ocp"
    assert get_recipe("int4").linear.input is None and get_recipe("int4").linear.weight.format == "int4"
    assert get_recipe("w4a8").linear.input.format == "fp8"
    assert [n for n, r in RECIPES.items() if r.quantize_matmul] == ["int8", "fp8"]


def test_unknown_recipe_lists_the_valid_names():
    with pytest.raises(ValueError, match="valid recipes: int8, fp8, nvfp4"):
        get_recipe("int3")


@pytest.mark.parametrize("kwargs, message", [
    ({"linear": QuantSpec("int8")}, r"SiteSpecs\(weight=..., input=...\)"),
    ({"matmul": SiteSpecs(weight=QuantSpec("int8"))}, r"matmul=SiteSpecs\(input="),
    ({"exclude": "*lm_head*"}, r"exclude=\['\*lm_head\*'\]"),
    ({"overrides": {"fc": QuantSpec("fp8")}}, "rather than a bare QuantSpec"),
    ({"learn_scales": True, "linear": SiteSpecs(input=QuantSpec("mxfp8"))}, "'int8' or 'fp8'"),
])
def test_validation_says_what_to_write(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        Recipe(**kwargs)


def test_site_specs_reject_format_names():
    with pytest.raises(TypeError, match=r"QuantSpec\('int8'\)"):
        SiteSpecs(input="int8")


def test_resolve_order_and_learn_scales():
    recipe = get_recipe("int8").with_(learn_scales=True, overrides={"head": None})
    roles, _ = recipe.resolve("layer.fc", SiteKind.LINEAR)
    assert roles["input"].learn_amax and not roles["weight"].learn_amax  # weights are dynamic
    assert recipe.resolve("head", SiteKind.LINEAR) == ({}, "override 'head' keeps it in float")
    assert "output head" in recipe.resolve("model.lm_head", SiteKind.LINEAR)[1]
    assert hash(recipe)  # frozen and hashable: overrides are stored as a tuple


def test_with_dynamic_ranges_keeps_formats_and_drops_calibration():
    int8 = get_recipe("int8")
    assert int8.needs_calibration and not get_recipe("mxfp4").needs_calibration
    dynamic = int8.with_dynamic_ranges()
    assert not dynamic.needs_calibration
    assert dynamic.linear.input == QuantSpec("int8", dynamic=True)
    assert dynamic.linear.weight == int8.linear.weight  # axis 0, dynamic already
    assert dynamic.quantize_matmul and dynamic.exclude == int8.exclude
    with_override = Recipe(
        "custom", SiteSpecs(input=QuantSpec("fp8")),
        overrides={"*.fc2": SiteSpecs(weight=QuantSpec("int4"), input=QuantSpec("nvfp4"))},
    ).with_dynamic_ranges()
    (_, specs), = with_override.overrides
    assert specs.input.dynamic and specs.weight.dynamic and specs.weight.block_size is None
    with pytest.raises(ValueError, match="learn_scales.*calibrate"):
        int8.with_(learn_scales=True).with_dynamic_ranges()


def test_attention_mode_is_checked_and_round_trips():
    int8 = get_recipe("int8")
    assert int8.attention == "qkv"
    with pytest.raises(ValueError, match="'qkv'.*'products'"):
        int8.with_(attention="fused")
    products = int8.with_(attention="products")
    assert recipe_from_dict(recipe_to_dict(products)) == products
    legacy = recipe_to_dict(int8)
    del legacy["attention"]  # saved before the field existed: the products were quantized
    assert recipe_from_dict(legacy).attention == "products"
