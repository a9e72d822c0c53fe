"""`import megatron_rpp` stays light: no megatron, vllm, ray or triton (STYLE.md habit 9)."""
import json
import subprocess
import sys

HEAVY = ("megatron", "vllm", "ray", "triton")


def _loaded_after(stmt: str) -> list[str]:
    code = (
        f"import sys, json; {stmt}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_megatron_rpp_is_light():
    assert _loaded_after("import megatron_rpp") == []


def test_subpackages_are_light_too():
    stmt = "; ".join(
        f"import megatron_rpp.{p}"
        for p in ("algorithms", "parallel", "models", "models.spec", "trainer", "parallel.spawn")
    )
    assert _loaded_after(stmt) == []


def test_the_check_itself_sees_heavy_imports():
    # Guard against a check that cannot fail: importing megatron.core is reported.
    assert "megatron" in _loaded_after("import megatron.core")
