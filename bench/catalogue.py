"""Mesh catalogues: how fast a node takes them in, and what finding a project's hosts costs.

The ceiling is PyNaCl's raw ed25519 verification rate, on one thread, over the signing
payloads of the very catalogues measured. The measured path is `decode_catalogue` (size
check, strict DAG-CBOR decoding, every field rule, the signature): what a node does with each
catalogue of a mesh exchange or of the mesh's gossip. It is measured on full catalogues (256
entries with names of 20 characters) with `MAX_CATALOGUE_ADDRS` addresses and with none, to
show what the addresses cost.

A second pair of figures is the lookup a follow (and the periodic sync, for a project no
peer shares) makes: the hosts of one project in a mesh whose catalogues fill the per-mesh
byte bound (`CatalogueBook.hosts_of`, a binary search per catalogue), beside building the
whole project-to-hosts map (`CatalogueBook.hosts`, what `ostrom mesh projects` does).

    python -m bench.catalogue [--catalogues N] [--out bench/results/catalogue.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import nacl.bindings

from bench.common import machine, write_result
from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.protocol import dagcbor
from ostrom.protocol.catalogue import (
    CATALOGUE_DOMAIN,
    MAX_CATALOGUE_ADDRS,
    MAX_CATALOGUE_BYTES_PER_MESH,
    MAX_CATALOGUE_ENTRIES,
    Catalogue,
    CatalogueBook,
    CatalogueEntry,
    SignedCatalogue,
    decode_catalogue,
    fit_entries,
    sign_catalogue,
)

# Repetitions of each timing; the median is reported.
REPEATS = 5
# When the catalogues are signed, and the reader's clock: they are all fresh.
NOW_MS = 1_700_000_000_000
MESH = CID.of_dag_cbor(dagcbor.encode({"mesh": "bench"}))


def project(n: int) -> CID:
    return CID.of_dag_cbor(dagcbor.encode({"project": n}))


def make_catalogues(count: int, addrs: int) -> list[SignedCatalogue]:
    """`count` full catalogues by distinct authors; entry names are 20 characters, the
    projects overlap between authors as in a mesh where popular projects have many hosts."""
    out = []
    for i in range(count):
        author = Identity.from_seed(i.to_bytes(4, "big") * 8)
        entries = fit_entries(
            CatalogueEntry(project((i * 37 + j) % 4096), f"project {j:012d}")
            for j in range(MAX_CATALOGUE_ENTRIES)
        )
        listed = tuple(f"/ip4/192.0.{i % 250}.{k + 1}/tcp/4001" for k in range(addrs))
        body = Catalogue(author.public_key, NOW_MS, MESH, entries, listed)
        out.append(sign_catalogue(body, author))
    return out


def timed(fn: Callable[[], object]) -> float:
    """Median seconds of `REPEATS` calls of `fn`."""
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def verify_ceiling(catalogues: list[SignedCatalogue]) -> float:
    """Raw ed25519 verifications per second over these catalogues' signing payloads."""
    items = []
    for record in catalogues:
        value = dagcbor.decode(record.data)
        assert isinstance(value, dict)
        sig = value.pop("sig")
        items.append((sig, CATALOGUE_DOMAIN + dagcbor.encode(value), record.body.author))

    def run() -> None:
        for sig, payload, key in items:
            nacl.bindings.crypto_sign_open(sig + payload, key)

    return len(items) / timed(run)


def decode_rate(catalogues: list[SignedCatalogue]) -> float:
    datas = [c.data for c in catalogues]

    def run() -> None:
        for data in datas:
            decode_catalogue(data)

    return len(datas) / timed(run)


def full_book(catalogues: list[SignedCatalogue]) -> CatalogueBook:
    book = CatalogueBook()
    for record in catalogues:
        book.offer(record, NOW_MS, lambda key: True)
    return book


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogues", type=int, default=200, help="catalogues made")
    parser.add_argument("--out", default="bench/results/catalogue.json")
    args = parser.parse_args(argv)

    with_addrs = make_catalogues(args.catalogues, MAX_CATALOGUE_ADDRS)
    without = make_catalogues(args.catalogues, 0)
    ceiling = verify_ceiling(with_addrs)
    rate = decode_rate(with_addrs)
    rate_without = decode_rate(without)

    book = full_book(with_addrs)
    held = book.of_mesh(MESH)
    wanted = [project(n) for n in range(0, 4096, 41)]

    def lookups() -> None:
        for p in wanted:
            book.hosts_of(MESH, p)

    lookup_s = timed(lookups) / len(wanted)
    whole_map_s = timed(lambda: book.hosts(MESH))
    result = {
        "benchmark": "catalogue",
        "machine": machine(),
        "catalogue_bytes": len(with_addrs[0].data),
        "catalogue_bytes_without_addrs": len(without[0].data),
        "addrs": MAX_CATALOGUE_ADDRS,
        "verify_ceiling_per_s": round(ceiling),
        "decode_per_s": round(rate),
        "decode_per_s_without_addrs": round(rate_without),
        "ratio_to_ceiling": round(rate / ceiling, 3),
        "addrs_cost": round(1 - rate / rate_without, 3),
        "book_catalogues": len(held),
        "book_bytes": book.total_bytes,
        "book_bytes_bound": MAX_CATALOGUE_BYTES_PER_MESH,
        "hosts_of_us": round(lookup_s * 1e6, 1),
        "whole_map_ms": round(whole_map_s * 1e3, 2),
        "hosts_of_over_whole_map": round(lookup_s / whole_map_s, 4),
    }
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
