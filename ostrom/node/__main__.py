"""`python -m ostrom.node`: the daemon process that `ostrom daemon` starts."""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from ostrom.datadir import resolve_data_dir
from ostrom.errors import OstromError
from ostrom.node.daemon import run_daemon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ostrom daemon", description="Run an Ostrom node.")
    parser.add_argument(
        "--data-dir",
        help="data directory (default: $OSTROM_HOME or the platform's user data directory)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    data_dir = resolve_data_dir(args.data_dir)
    try:
        trio.run(run_daemon, data_dir)
    except OstromError as exc:
        print(f"ostrom daemon: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
