"""The ``acmix`` command line.

One function per subcommand; each registers itself with :func:`command`.
Run ``acmix --help`` for the list.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable, str]] = {}


def command(name: str, help: str):
    """Register ``func(args) -> int`` as subcommand ``name``; ``configure(parser)`` adds options."""

    def wrap(configure: Callable[[argparse.ArgumentParser], None]):
        def inner(run: Callable) -> Callable:
            _COMMANDS[name] = (configure, run, help)
            return run

        return inner

    return wrap


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="acmix",
        description="ACmix: integration of self-attention and convolution (Pan et al., CVPR 2022).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (configure, _, help_text) in sorted(_COMMANDS.items()):
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
    return parser


def _configure_list_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="acmix_*", help="glob over model names")


@command("list-models", "list the registered ACmix models")(_configure_list_models)
def list_models(args: argparse.Namespace) -> int:
    import timm

    import acmix  # noqa: F401  (registers the models)

    for name in timm.list_models(args.pattern):
        print(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``acmix`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _, run, _ = _COMMANDS[args.command]
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
