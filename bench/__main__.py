"""`python -m bench`: run every benchmark and write JSON to bench/results/."""

from __future__ import annotations

import sys

from bench import catalogue, import_rate, reconcile


def main() -> int:
    import_rate.main(sys.argv[1:])
    reconcile.main([])
    catalogue.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
