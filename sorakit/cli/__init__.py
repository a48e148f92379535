"""Command-line interface: `sorakit STAGE ...`."""

from __future__ import annotations

import importlib
import sys

# One module per concern; each registers its commands on the apps in sorakit.cli.app.
COMMAND_MODULES = ["data", "vae", "captioner", "dit", "generate", "refiner", "report"]


def load_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"sorakit.cli.{name}")


def main(argv: list[str] | None = None) -> int:
    from sorakit.cli.app import main as run

    code = run(argv)
    if argv is None:
        sys.exit(code)
    return code
