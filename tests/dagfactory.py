"""Build signed project DAGs for tests in a line each.

Every record is really signed (`records.sign`) by a deterministic identity, so what you build
is what a node would receive.

    from tests.dagfactory import World, identity

    world = World()
    alice, bob = identity("alice"), identity("bob")
    g = world.genesis(alice)                             # alice founds; quorum 1
    c1 = world.contribute(bob, g, [g], {"README": "hi"})  # bob proposes a file
    world.validate(alice, c1)                            # alice accepts it
    gov = world.govern(alice, g, [c1], "add-maintainer", key=bob)
    state = world.evaluate(g)                            # acceptance.evaluate over all records
    tree = world.replay(state.accepted_heads)            # tree.replay over all records

- `identity(name)`: the same key for the same name, in every test (seed = sha256(name)).
- Wherever a record is expected you may pass the `SignedRecord` or its `CID`.
- `changes` maps a path to its new content (`str` or `bytes`), to `None` (delete), or to a
  ready `Put`/`Delete`; pass a list of such mappings to make several changesets (later ones
  override earlier ones). Content is not chunked: the file CID is `file_cid(content)`, a
  stand-in manifest CID, and the size is the content's length. `exec=True` marks every put.
- Timestamps come from a clock that steps 1000 ms per record unless you pass `ts=`.
- `world.records` holds every record made (a dict by CID, in creation order) and
  `world.changesets` every changeset block; `world.changeset(cid)` raises `NotFound`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import TypeAlias

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity
from ostrom.errors import InvalidInput, NotFound
from ostrom.protocol.acceptance import ProjectState, evaluate
from ostrom.protocol.changesets import Change, Changeset, Delete, Put
from ostrom.protocol.records import (
    Body,
    Contribution,
    ForkOf,
    Governance,
    GovernanceAction,
    Policy,
    Project,
    SignedRecord,
    Validation,
    Verdict,
    sign,
)
from ostrom.protocol.tree import Tree, replay

Ref: TypeAlias = SignedRecord | CID
Key: TypeAlias = Identity | bytes
Content: TypeAlias = str | bytes | Put | Delete | None
Changes: TypeAlias = Mapping[str, Content] | Sequence[Mapping[str, Content]]

# 2023-11-14 in ms: a plausible present-day timestamp, far from both ends of the valid range.
START_TS = 1_700_000_000_000
# The default clock step: records made one after another are a second apart.
STEP_MS = 1000


@cache
def identity(name: str) -> Identity:
    """A deterministic identity: the same name gives the same key in every test run."""
    return Identity.from_seed(hashlib.sha256(name.encode()).digest())


def key_of(key: Key) -> bytes:
    return key.public_key if isinstance(key, Identity) else key


def cid_of(ref: Ref) -> CID:
    return ref.cid if isinstance(ref, SignedRecord) else ref


def file_cid(content: str | bytes) -> CID:
    """The stand-in manifest CID the factory uses for a file with this content."""
    data = content.encode() if isinstance(content, str) else content
    return CID.of_dag_cbor(b"file:" + data)


def make_change(path: str, content: Content, *, exec: bool = False) -> Change:
    if content is None:
        return Delete(path)
    if isinstance(content, (Put, Delete)):
        return content
    data = content.encode() if isinstance(content, str) else content
    return Put(path=path, file=file_cid(data), size=len(data), exec=exec)


class World:
    """Every record and changeset made by one test, across any number of projects."""

    def __init__(self, start_ts: int = START_TS) -> None:
        self.records: dict[CID, SignedRecord] = {}
        self.changesets: dict[CID, Changeset] = {}
        self._ts = start_ts

    # --- plumbing ---------------------------------------------------------------------------

    def tick(self) -> int:
        self._ts += STEP_MS
        return self._ts

    def _sign(self, body: Body, author: Identity) -> SignedRecord:
        record = sign(body, author)
        self.records[record.cid] = record
        return record

    def _ts_or_tick(self, ts: int | None) -> int:
        return self.tick() if ts is None else ts

    def changeset(self, cid: CID) -> Changeset:
        try:
            return self.changesets[cid]
        except KeyError:
            raise NotFound(f"no changeset {cid}") from None

    def add_changeset(self, changes: Mapping[str, Content], *, exec: bool = False) -> CID:
        changeset = Changeset(
            tuple(make_change(path, changes[path], exec=exec) for path in sorted(changes))
        )
        cid = CID.of_dag_cbor(changeset.encode())
        self.changesets[cid] = changeset
        return cid

    # --- records ----------------------------------------------------------------------------

    def genesis(
        self,
        founder: Identity,
        *,
        maintainers: Iterable[Key] | None = None,
        quorum: int = 1,
        name: str = "demo",
        license: str = "MIT",
        fork_of: tuple[Ref, Iterable[Ref]] | None = None,
        ts: int | None = None,
    ) -> SignedRecord:
        """A project genesis. Maintainers default to the founder alone."""
        keys = sorted({key_of(k) for k in (maintainers or [founder])})
        fork = None
        if fork_of is not None:
            upstream, heads = fork_of
            fork = ForkOf(
                project=cid_of(upstream),
                heads=tuple(sorted({cid_of(h) for h in heads}, key=lambda c: c.raw)),
            )
        body = Project(
            author=founder.public_key,
            ts=self._ts_or_tick(ts),
            name=name,
            license=license,
            policy=Policy(maintainers=tuple(keys), quorum=quorum),
            fork_of=fork,
        )
        return self._sign(body, founder)

    def fork(
        self,
        founder: Identity,
        upstream: Ref,
        heads: Iterable[Ref],
        *,
        maintainers: Iterable[Key] | None = None,
        quorum: int = 1,
        name: str = "fork",
        ts: int | None = None,
    ) -> SignedRecord:
        """A fork of `upstream` at `heads`, founded by `founder`."""
        return self.genesis(
            founder,
            maintainers=maintainers,
            quorum=quorum,
            name=name,
            fork_of=(upstream, heads),
            ts=ts,
        )

    def contribute(
        self,
        author: Identity,
        project: Ref,
        parents: Iterable[Ref],
        changes: Changes | None = None,
        *,
        message: str = "a change",
        exec: bool = False,
        ts: int | None = None,
    ) -> SignedRecord:
        batches: Sequence[Mapping[str, Content]]
        if changes is None:
            batches = ()
        elif isinstance(changes, Mapping):
            batches = (changes,)
        else:
            batches = changes
        body = Contribution(
            author=author.public_key,
            ts=self._ts_or_tick(ts),
            project=cid_of(project),
            parents=tuple(sorted({cid_of(p) for p in parents}, key=lambda c: c.raw)),
            changes=tuple(self.add_changeset(batch, exec=exec) for batch in batches),
            message=message,
        )
        return self._sign(body, author)

    def validate(
        self,
        author: Identity,
        target: Ref,
        verdict: Verdict = "accept",
        *,
        project: Ref | None = None,
        note: str = "",
        ts: int | None = None,
    ) -> SignedRecord:
        """A validation; the project defaults to the target's own project."""
        if project is None:
            if not isinstance(target, SignedRecord):
                raise InvalidInput("pass project= when the target is a bare CID")
            project = target.project
        body = Validation(
            author=author.public_key,
            ts=self._ts_or_tick(ts),
            project=cid_of(project),
            target=cid_of(target),
            verdict=verdict,
            note=note,
        )
        return self._sign(body, author)

    def govern(
        self,
        author: Identity,
        project: Ref,
        parents: Iterable[Ref],
        action: GovernanceAction,
        *,
        key: Key | None = None,
        quorum: int | None = None,
        ts: int | None = None,
    ) -> SignedRecord:
        body = Governance(
            author=author.public_key,
            ts=self._ts_or_tick(ts),
            project=cid_of(project),
            parents=tuple(sorted({cid_of(p) for p in parents}, key=lambda c: c.raw)),
            action=action,
            key=None if key is None else key_of(key),
            quorum=quorum,
        )
        return self._sign(body, author)

    # --- running the rules ------------------------------------------------------------------

    def evaluate(self, genesis: SignedRecord) -> ProjectState:
        return evaluate(genesis, self.records.values())

    def replay(self, heads: Iterable[Ref]) -> Tree:
        return replay([cid_of(h) for h in heads], self.records, self.changeset)
