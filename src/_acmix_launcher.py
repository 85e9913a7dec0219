"""The ``acmix`` console script: read the command line before the library is imported.

``import acmix`` registers every model with timm (``timm.create_model("acmix_tiny")``
and timm's ``train.py --device-modules acmix`` rely on that), so it imports torch
and timm: seconds. ``acmix --help``, ``acmix train --help`` or a mistyped option
need none of it. This launcher loads :mod:`acmix.cli` with the package's
``__init__`` not yet run (its submodules import lazily, inside the commands),
lets argparse print the help or refuse the line, and only then runs
``acmix/__init__.py`` into the same module object, exactly as ``import acmix``
would, before the command runs. Nothing else differs from :func:`acmix.cli.main`;
``python -m acmix`` (what ``torchrun -m acmix`` runs) imports the package as usual.

It is a top-level module because a module inside ``acmix`` cannot be imported
without running ``acmix/__init__.py`` first.
"""

from __future__ import annotations

import importlib.util
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), initialise :mod:`acmix`, run the command.

    Returns:
        The command's exit status (``--help`` and usage errors exit from argparse).
    """
    if "acmix" in sys.modules:  # imported already: nothing left to defer
        from acmix.cli import main as run

        return run(argv)
    spec = importlib.util.find_spec("acmix")
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("the acmix package is not installed", name="acmix")
    package = importlib.util.module_from_spec(spec)
    sys.modules["acmix"] = package  # __path__ is set: acmix.cli imports, __init__ waits
    try:
        from acmix import cli

        args = cli.parse_command_line(argv)
        spec.loader.exec_module(package)  # `import acmix`, now that the line is valid
    except BaseException:
        # Do not leave a package without its __init__ behind (for callers that catch this).
        for name in [m for m in sys.modules if m == "acmix" or m.startswith("acmix.")]:
            del sys.modules[name]
        raise
    return cli.run_command(args)


if __name__ == "__main__":
    sys.exit(main())
