import pytest

from megatron_rpp.algorithms.registry import Registry, RegistryError, UnknownNameError


def test_register_get_names_contains():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    reg.register("a", 1)
    assert b() == "b"  # the decorator returns the function itself
    assert reg.get("b") is b and reg.get("a") == 1
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg


def test_duplicate_name_is_an_error():
    reg = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(RegistryError, match="widget 'a' is already registered"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_unknown_name_lists_valid_names_sorted():
    reg = Registry("widget")
    for name in ("zeta", "alpha", "mid"):
        reg.register(name, name)
    with pytest.raises(UnknownNameError) as err:
        reg.get("nope")
    assert "unknown widget 'nope'; valid names: alpha, mid, zeta" in str(err.value)
    # catchable both ways
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)


def test_bad_names_rejected():
    reg = Registry("widget")
    for bad in ("", "a:b", 3):
        with pytest.raises(RegistryError):
            reg.register(bad, 1)


def test_coerce_applies_on_register_and_plugin(tmp_path):
    reg = Registry("widget", coerce=lambda o: ("wrapped", o))
    reg.register("x", 5)
    assert reg.get("x") == ("wrapped", 5)
    f = tmp_path / "plug.py"
    f.write_text("def fn():\n    return 42\n")
    kind, fn = reg.get(f"{f}:fn")
    assert kind == "wrapped" and fn() == 42
    assert reg.get(f"{f}:fn")[1] is fn  # loaded once


def test_plugin_from_file_and_module(tmp_path):
    reg = Registry("widget")
    f = tmp_path / "my_plugin.py"
    f.write_text("VALUE = 7\n")
    assert reg.get(f"{f}:VALUE") == 7
    assert reg.get("math:pi") == pytest.approx(3.141592653589793)
    with pytest.raises(RegistryError, match="has no attribute"):
        reg.get(f"{f}:MISSING")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.get(f"{tmp_path}/absent.py:x")
