"""`python -m ostrom.node`: the daemon process that `ostrom daemon` starts."""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from typing import Final

import trio

from ostrom.datadir import resolve_data_dir
from ostrom.errors import OstromError
from ostrom.node.config import DaemonConfig, load_config
from ostrom.node.daemon import run_daemon

# Exit status when the daemon refuses to start (another daemon owns the data directory, a
# bad config.toml, an unusable listen address): EX_CONFIG from sysexits.h, distinct from a
# crash (1), so a service manager restarts a crashed node but not one that cannot start.
EXIT_CANNOT_START = 78


def add_network_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help="address to listen on (repeatable; default /ip4/0.0.0.0/tcp/4001, "
        "or `listen` in config.toml; port 0 picks a free port)",
    )
    parser.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="a peer to dial at start, ending in /p2p/<peer id> (repeatable)",
    )
    parser.add_argument(
        "--no-mdns", action="store_true", help="do not discover peers on the local network"
    )
    parser.add_argument(
        "--no-dht",
        action="store_true",
        help="stay off the public DHT: announce no project there and look none up "
        "(peers are then found through meshes, bootstrap addresses and mDNS)",
    )
    limits = parser.add_argument_group(
        "limits", "what the node may use (0 or 'unlimited': no limit; overrides config.toml)"
    )
    limits.add_argument(
        "--spare",
        action="store_true",
        help="start from the Raspberry Pi preset: 256KiB/s up, 1MiB/s down, 8GiB of storage, "
        "2GiB per project, 24 peers",
    )
    limits.add_argument("--upload-limit", metavar="RATE", help="e.g. 256KiB/s")
    limits.add_argument("--download-limit", metavar="RATE", help="e.g. 1MiB/s")
    limits.add_argument("--storage-limit", metavar="SIZE", help="e.g. 8GiB")
    limits.add_argument("--project-storage-limit", metavar="SIZE", help="e.g. 2GiB")
    limits.add_argument("--max-peers", type=int, metavar="N", help="connected peers at most")


# Limit flags and the `Limits` field each sets.
_LIMIT_FLAGS: Final = {
    "upload_limit": "upload_rate",
    "download_limit": "download_rate",
    "storage_limit": "storage",
    "project_storage_limit": "project_storage",
    "max_peers": "max_peers",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ostrom daemon", description="Run an Ostrom node.")
    parser.add_argument(
        "--data-dir",
        help="data directory (default: $OSTROM_HOME or the platform's user data directory)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    add_network_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    data_dir = resolve_data_dir(args.data_dir)
    try:
        config = load_config(data_dir.root / "config.toml")
        config = DaemonConfig(
            listen=tuple(args.listen) if args.listen else config.listen,
            bootstrap=tuple(args.bootstrap) if args.bootstrap else config.bootstrap,
            mdns=config.mdns and not args.no_mdns,
            dht=config.dht and not args.no_dht,
            spare=config.spare or args.spare,
            limit_settings=config.limit_settings
            + tuple(
                (name, getattr(args, flag))
                for flag, name in _LIMIT_FLAGS.items()
                if getattr(args, flag) is not None
            ),
        )
        trio.run(partial(run_daemon, data_dir, config=config))
    except OstromError as exc:
        print(f"ostrom daemon: {exc.message}", file=sys.stderr)
        return EXIT_CANNOT_START
    return 0


if __name__ == "__main__":
    sys.exit(main())
