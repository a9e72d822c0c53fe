"""megatron_rpp.algorithms is pure: it imports torch and the standard library only."""

import ast
import subprocess
import sys
from pathlib import Path

import megatron_rpp.algorithms as algorithms

PKG_DIR = Path(algorithms.__file__).parent
ALLOWED_THIRD_PARTY = {"torch"}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: use absolute imports"
            names.add(node.module)
    return names


def test_every_module_imports_only_torch_stdlib_and_itself():
    files = sorted(PKG_DIR.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in _imported_modules(path):
            top = name.split(".")[0]
            ok = (
                top in sys.stdlib_module_names
                or top in ALLOWED_THIRD_PARTY
                or top == "__future__"
                or name == "megatron_rpp.algorithms"
                or name.startswith("megatron_rpp.algorithms.")
            )
            assert ok, f"{path.name} imports {name!r}"


def test_import_pulls_in_nothing_heavy():
    code = (
        "import sys, megatron_rpp.algorithms\n"
        "heavy = ('megatron', 'vllm', 'ray', 'triton', 'transformers', 'torch.distributed.fsdp')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
