"""Wires every subcommand into the parser; see ``hasentinel.cli``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hasentinel.config import ConfigError, load_settings


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid configuration:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 1
    if not settings.configured:
        print(
            f"{args.config}: valid, but no masters are configured yet; "
            "the daemon will wait (run `hasentinel init --masters ...`)"
        )
        return 0
    print(f"{args.config}: valid ({len(settings.masters)} masters, listen {settings.listen})")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check-config",
        help="validate the configuration; print every error with its dotted key",
        description="Validate the configuration file. Exit 0 when valid, 1 with every error listed.",
    )
    p.set_defaults(func=cmd_check_config)
