"""Regenerate ``docs/config.md`` from the field docstrings: ``python -m megatron_rpp.config.docs [PATH]``."""
from __future__ import annotations

import sys
from pathlib import Path

HEADER = """# Configuration reference

Generated from the field docstrings in `megatron_rpp/config/schema.py` (`megatron-rpp config-help` prints the same).
Every field can be set in the YAML file or overridden as `section.key=value` on the command line.
An unknown key or a bad value stops the run with an error naming the key and the allowed keys or values.
"""


def render() -> str:
    from megatron_rpp.config.loader import help_text

    return f"{HEADER}\n```\n{help_text()}\n```\n"


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else Path(__file__).parents[2] / "docs" / "config.md"
    path.write_text(render())
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
