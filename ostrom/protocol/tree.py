"""Tree replay: the files of a project at a set of heads.

`replay(heads, records, changesets)` replays the changes of every ancestor of `heads`
(inclusive, following `parents` across projects, so a fork reaches upstream records).

For each path it keeps the *frontier* of writes: a write by record R supersedes every
frontier write by an ancestor of R, and a write concurrent with the others joins the
frontier. The final frontier of a path is therefore the set of its writes that no later
write descends from, whatever topological order is used to get there: the result depends
on the DAG alone. A frontier of several writes with different values (file CID and exec
bit, or deleted) is a conflict: it is reported, and the write with the greatest
`(ts, cid bytes)` wins (a winning delete removes the path). Concurrent writes of one value
are not a conflict. A file that is also a directory of another live path (`a` and `a/b`) is
a conflict too: the directory wins and the file is dropped.

Ancestry queries are answered from interval lists: nodes are numbered in a depth-first
post-order, which keeps each node's ancestors in few runs of consecutive numbers (one or
two in a chain, a wide fan-out or a short-branch-and-merge history), so a query is one
binary search and building the lists costs about one small tuple per record.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

from ostrom.crypto.cid import CID
from ostrom.errors import InvalidInput, NotFound
from ostrom.protocol.changesets import Changeset, Put
from ostrom.protocol.paths import parent_dirs
from ostrom.protocol.records import Contribution, SignedRecord


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A live file: its manifest, size and exec bit, and the contribution that wrote it."""

    path: str
    file: CID
    size: int
    exec: bool
    record: CID


@dataclass(frozen=True, slots=True)
class Conflict:
    """Concurrent writes to `path` that disagree, or a file shadowed by a directory.

    `candidates` are the CIDs of the contributions whose writes competed, sorted by CID
    bytes; `chosen` is the one whose write won. When the winning write was a delete the
    path is absent from the tree. For a file/directory clash the chosen record is the
    latest writer of a file under the directory.
    """

    path: str
    candidates: tuple[CID, ...]
    chosen: CID

    def __post_init__(self) -> None:
        if self.chosen not in self.candidates:
            raise InvalidInput("a conflict's chosen record is one of its candidates")


@dataclass(frozen=True, slots=True)
class Tree:
    """The files at some heads (sorted by path) and the conflicts met (sorted by path)."""

    files: Mapping[str, FileEntry]
    conflicts: tuple[Conflict, ...]


# A write's value: (file, size, exec) for a put, None for a delete.
_Value: TypeAlias = tuple[CID, int, bool] | None
# A frontier write: (node number, value).
_Write: TypeAlias = tuple[int, _Value]


def _order(
    heads: Iterable[CID], records: Mapping[CID, SignedRecord]
) -> tuple[list[SignedRecord], list[tuple[int, ...]]]:
    """The ancestors of `heads` in depth-first post-order, and each one's parents' numbers.

    Every record is checked to sit under its own CID, so the graph cannot have a cycle (that
    would need a SHA-256 cycle) and the walk ends.
    """
    number: dict[bytes, int] = {}
    order: list[SignedRecord] = []
    parent_numbers: list[tuple[int, ...]] = []
    for head in sorted(set(heads), key=_raw):
        if head.raw in number:
            continue
        stack: list[tuple[SignedRecord, int]] = [(_get(records, head, None), 0)]
        while stack:
            record, next_parent = stack[-1]
            parents = record.parents
            if next_parent < len(parents):
                stack[-1] = (record, next_parent + 1)
                parent = parents[next_parent]
                if parent.raw not in number:
                    stack.append((_get(records, parent, record.cid), 0))
                continue
            stack.pop()
            number[record.cid.raw] = len(order)
            order.append(record)
            parent_numbers.append(tuple(number[p.raw] for p in parents))
    return order, parent_numbers


def _get(records: Mapping[CID, SignedRecord], cid: CID, child: CID | None) -> SignedRecord:
    record = records.get(cid)
    if record is None:
        if child is None:
            raise NotFound(f"head {cid} is not among the records")
        raise NotFound(f"record {cid} (a parent of {child}) is not among the records")
    if record.cid != cid:
        raise InvalidInput(f"the records map {cid} to a different record, {record.cid}")
    return record


def _ancestry(parent_numbers: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """For each node, its ancestors and itself as flat sorted runs (start, end, start, ...).

    A number x is in the set iff `bisect_right(runs, x)` is odd.
    """
    out: list[tuple[int, ...]] = []
    for i, parents in enumerate(parent_numbers):
        if not parents:
            out.append((i, i + 1))
            continue
        if len(parents) == 1:
            runs = out[parents[0]]
            out.append((*runs[:-1], i + 1) if runs[-1] == i else (*runs, i, i + 1))
            continue
        pairs: list[tuple[int, int]] = [(i, i + 1)]
        for p in parents:
            runs = out[p]
            pairs.extend(zip(runs[::2], runs[1::2], strict=True))
        pairs.sort()
        merged: list[int] = []
        for start, end in pairs:
            if merged and start <= merged[-1]:
                if end > merged[-1]:
                    merged[-1] = end
            else:
                merged += (start, end)
        out.append(tuple(merged))
    return out


def _writes(
    record: SignedRecord, changesets: Callable[[CID], Changeset]
) -> Iterable[tuple[str, _Value]]:
    body = record.body
    if not isinstance(body, Contribution) or not body.changes:
        return ()
    if len(body.changes) == 1:
        return _values(_changeset(changesets, body.changes[0], record.cid)).items()
    values: dict[str, _Value] = {}
    for link in body.changes:  # a later changeset overrides an earlier one
        values.update(_values(_changeset(changesets, link, record.cid)))
    return values.items()


def _changeset(changesets: Callable[[CID], Changeset], link: CID, record: CID) -> Changeset:
    try:
        return changesets(link)
    except KeyError:
        raise NotFound(f"changeset {link} of {record} is not available") from None


def _values(changeset: Changeset) -> dict[str, _Value]:
    return {
        change.path: (change.file, change.size, change.exec) if isinstance(change, Put) else None
        for change in changeset.changes
    }


def _same(a: _Value, b: _Value) -> bool:
    """Two writes agree when both delete, or both put one file with one exec bit."""
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and a[2] == b[2]


def replay(
    heads: Iterable[CID],
    records: Mapping[CID, SignedRecord],
    changesets: Callable[[CID], Changeset],
) -> Tree:
    """The tree at `heads` (see the module doc).

    `changesets` returns a changeset block by CID; it may raise `NotFound` or `KeyError`
    for one it lacks. A missing record or changeset raises `NotFound` naming it.
    """
    order, parent_numbers = _order(heads, records)
    ancestry = _ancestry(parent_numbers)
    frontiers: dict[str, list[_Write]] = {}
    for i, record in enumerate(order):
        runs = ancestry[i]
        for path, value in _writes(record, changesets):
            frontier = frontiers.get(path)
            if frontier is None:
                frontiers[path] = [(i, value)]
                continue
            # Keep the writes R does not descend from; an earlier write's node number is
            # smaller than i, so "ancestor" is "inside R's runs".
            kept = [w for w in frontier if not bisect_right(runs, w[0]) & 1]
            kept.append((i, value))
            frontiers[path] = kept

    def rank(write: _Write) -> tuple[int, bytes]:
        winner = order[write[0]]
        return winner.ts, winner.cid.raw

    live: dict[str, tuple[CID, int, bool, int]] = {}  # path: (file, size, exec, node)
    conflicts: dict[str, Conflict] = {}
    for path, frontier in frontiers.items():
        best = max(frontier, key=rank) if len(frontier) > 1 else frontier[0]
        if len(frontier) > 1 and not all(_same(w[1], best[1]) for w in frontier):
            conflicts[path] = Conflict(
                path=path,
                candidates=tuple(sorted((order[w[0]].cid for w in frontier), key=_raw)),
                chosen=order[best[0]].cid,
            )
        if best[1] is not None:
            live[path] = (*best[1], best[0])

    _drop_shadowed_files(live, conflicts, order)
    files: dict[str, FileEntry] = {}
    for path in sorted(live):
        file, size, exec_, node = live[path]
        files[path] = FileEntry(path, file, size, exec_, order[node].cid)
    return Tree(
        files=MappingProxyType(files),
        conflicts=tuple(conflicts[path] for path in sorted(conflicts)),
    )


def _raw(cid: CID) -> bytes:
    return cid.raw


def _drop_shadowed_files(
    live: dict[str, tuple[CID, int, bool, int]],
    conflicts: dict[str, Conflict],
    order: list[SignedRecord],
) -> None:
    """Remove files that are also directories of live paths; report each as a conflict."""
    shadowed = {d for path in live if "/" in path for d in parent_dirs(path) if d in live}
    if not shadowed:
        return
    files = {path: live.pop(path)[3] for path in shadowed}
    # The directory side of each clash: the latest writer of a surviving file below it.
    below: dict[str, int] = {}
    for path, (_, _, _, node) in live.items():
        if "/" not in path:
            continue
        for d in parent_dirs(path):
            if d in files:
                current = below.get(d)
                if current is None or (order[node].ts, order[node].cid.raw) > (
                    order[current].ts,
                    order[current].cid.raw,
                ):
                    below[d] = node
    for path, file_node in files.items():
        chosen = order[below[path]].cid
        candidates = {order[file_node].cid, chosen}
        previous = conflicts.get(path)
        if previous is not None:
            candidates.update(previous.candidates)
        conflicts[path] = Conflict(
            path=path, candidates=tuple(sorted(candidates, key=_raw)), chosen=chosen
        )
