"""The record ids one project's sync reconciles (PROTOCOL.md 11.3), kept as records arrive.

A project's sync set is its *seeds* (the records whose `project` is the project, and the
genesis records of its public forks) and every record their history reaches: the parents
of a member that this node holds are members too. So the set of a fork holds the upstream
records it forks at and everything below them, and the set of a project that merged work
from a fork holds that work; a follower of either side gets the whole history by
reconciling that one set, whatever its depth, instead of chasing parents a generation per
round trip.

Two nodes holding the same records compute the same set. A node's set stops where its
history has a hole: the parents members name that the node lacks are kept in `absent`, so
that when one of them arrives it joins the set, and its own stored parents with it.

This module is pure: the walk through stored records that growing a set may need is the
caller's (`ostrom.node.store.Store.reach`, or a dict in the simulation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Final

from ostrom.crypto.cid import CID_LENGTH
from ostrom.protocol.reconcile import ReconcileIndex

# Missing parents remembered per set (about 100 bytes each). A replica at rest lacks a few;
# a catch-up, whose records arrive in CID order rather than parents first, passes through
# about a quarter of the records it fetches (25,000 for 100,000), and records naming invented
# parents could grow the set without end. Past the bound the set is marked `overflowed` and
# its owner builds it again from the store before its next use: that forgets the parents that
# arrived meanwhile, and a set that is still over the bound then stays as built.
MAX_ABSENT: Final = 65_536


# A walk through stored records: from some binary CIDs, through `parents`, not entering the
# CIDs the predicate accepts; it returns the stored records reached and the CIDs reached that
# are not stored (`ostrom.node.store.Store.reach`).
Reach = Callable[[set[bytes], Callable[[bytes], bool]], tuple[list[bytes], set[bytes]]]


def links(parents: bytes) -> list[bytes]:
    """The binary CIDs in a parents column (`RecordRow` parents: CIDs concatenated)."""
    return [parents[i : i + CID_LENGTH] for i in range(0, len(parents), CID_LENGTH)]


class SyncSet:
    """One project's sync set: an index of its member ids and the parents it lacks."""

    __slots__ = ("absent", "index", "overflowed")

    def __init__(self, index: ReconcileIndex, absent: Iterable[bytes] = ()) -> None:
        self.index = index
        self.absent: set[bytes] = set()
        # True once growing the set dropped a missing parent: a record arriving later may
        # then not join as it should, so the set is to be built again (see MAX_ABSENT).
        self.overflowed = False
        self._remember(absent)
        self.overflowed = False  # building it again would not make a built set smaller

    @classmethod
    def build(cls, seeds: Iterable[tuple[bytes, bytes]], reach: Reach) -> SyncSet:
        """The set of `seeds` (each a binary CID and its parents column): they, and what
        `reach` finds walking from the parents they name outside themselves."""
        own = dict(seeds)
        start = {parent for parents in own.values() for parent in links(parents)}
        found, absent = reach(start - own.keys(), own.__contains__)
        return cls(ReconcileIndex.build([*own, *found]), absent)

    def __contains__(self, raw: object) -> bool:
        return raw in self.index

    def __len__(self) -> int:
        return len(self.index)

    def admit(self, stored: Mapping[bytes, bytes], seeds: Iterable[bytes]) -> set[bytes]:
        """Take in records just stored.

        `stored` maps each new record's binary CID to its parents column; `seeds` are those
        of them that are members by themselves. They join, and so does every new record a
        member reaches (a parent that was `absent`, or one stored in the same batch). Returns
        the parents that members name and that are neither members, nor in `stored`, nor
        known to be absent: the caller looks them up in its store (a walk through them, not
        entering members) and hands the result to `extend`.
        """
        index, absent = self.index, self.absent
        work = list(seeds)
        if absent:
            if len(absent) < len(stored):
                work.extend(raw for raw in absent if raw in stored)
            else:
                work.extend(raw for raw in stored if raw in absent)
        added: set[bytes] = set()
        lookup: set[bytes] = set()
        while work:
            raw = work.pop()
            if raw in added or raw in index:
                continue
            added.add(raw)
            for parent in links(stored.get(raw, b"")):
                if parent in stored:
                    work.append(parent)  # checked when taken
                elif parent not in absent and parent not in index:
                    lookup.add(parent)
        index.update(added, unheld=True)  # each was checked when taken
        absent -= added
        return lookup

    def extend(self, found: Iterable[bytes], absent: Iterable[bytes]) -> None:
        """Add what a walk from `admit`'s lookups found: stored records reached (members now)
        and CIDs reached that are not stored (remembered as absent)."""
        found = list(found)
        self.index.update(found)
        self.absent.difference_update(found)
        self._remember(raw for raw in absent if raw not in self.index)

    def _remember(self, absent: Iterable[bytes]) -> None:
        for raw in absent:
            if len(self.absent) >= MAX_ABSENT:
                self.overflowed = True
                return
            self.absent.add(raw)
