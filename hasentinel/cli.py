"""The ``hasentinel`` command line.

Each subcommand lives beside the concern it drives; a module that owns
commands exposes ``register(subparsers)``, which adds its parsers and sets
``func`` to a callable taking the parsed arguments and returning the exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hasentinel import __version__

DEFAULT_CONFIG = "/etc/hasentinel/hasentinel.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hasentinel",
        description=(
            "Keeps this node's local HAProxy pointed at healthy kube-apiservers: "
            "probes every master's /readyz over TLS and applies the result to HAProxy."
        ),
    )
    parser.add_argument("--version", action="version", version=f"hasentinel {__version__}")
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True

    # Imported here so that `hasentinel --help` stays fast and a broken optional
    # module cannot stop the others from loading.
    from hasentinel import commands

    commands.register(subparsers)
    # `--config` is accepted after the subcommand too (`hasentinel status --config F`).
    for subparser in subparsers.choices.values():
        subparser.add_argument(
            "--config", default=argparse.SUPPRESS, metavar="PATH", help="configuration file"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
