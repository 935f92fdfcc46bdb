"""Command line: ``python -m custom <command> --help``.

Commands: synthesize (demo data), datalist (cross-validation lists), evaluate (BraTS metrics of a folder),
visualize (pictures), package (bundle zip), benchmark (speed and memory).
"""

from __future__ import annotations

import functools
import importlib

from custom.core.errors import clean_exit

# command -> (module, function): modules are imported only for the command that runs
COMMANDS = {
    "synthesize": ("custom.data.synthetic", "synthesize"),
    "datalist": ("custom.data.datalist", "write_datalist"),
    "evaluate": ("custom.evaluation.folders", "evaluate_folder"),
    "visualize": ("custom.tools.visualize", "visualize"),
    "package": ("custom.tools.package", "package"),
    "benchmark": ("custom.tools.benchmark", "benchmark"),
}


def _command(module: str, function: str):
    """The function behind a command, returning nothing so that fire prints only what the command prints."""
    target = clean_exit(getattr(importlib.import_module(module), function))  # data problems: one message, exit 1

    @functools.wraps(target)
    def command(*args, **kwargs) -> None:
        target(*args, **kwargs)

    return command


def main() -> None:
    import sys

    import fire

    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name in COMMANDS:
        # only this command's module is imported; --help shows its arguments and docstring
        fire.Fire(_command(*COMMANDS[name]), command=sys.argv[2:], name=name)
        return
    print("usage: python -m custom COMMAND [--help | ARGS]\ncommands:")
    for command, (module, function) in COMMANDS.items():
        print(f"  {command:<11} {module}.{function}")
    if name:
        raise SystemExit(f"unknown command {name!r}")


if __name__ == "__main__":
    main()
