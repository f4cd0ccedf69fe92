"""The acceptance rule: which records of a project are accepted, rejected or pending.

`evaluate(genesis, records)` judges every contribution and governance record of one project
(a "P-record": `project == genesis.cid`) from the records at hand. It is a pure function of
the set of records: the order they come in, duplicates and unrelated records never change
the answer.

The rule, per project P with genesis G:

- G is accepted. Every present ancestor of G (for a fork: the parent project's records at
  and below `fork_of.heads`) is *inherited*: accepted in P by the fork's founding.
- Only P-records get a status. A record of another project that is an ancestor of a
  P-record is *foreign*: it has no status of its own and counts as an accepted parent once
  it is present and so are all its parents, each of them counting as accepted in P in turn
  (inherited, the genesis, an accepted P-record, or such a foreign record). So merging
  upstream work cannot smuggle in a pending P-record, and the tree of an accepted head can
  always be replayed.
- Records are judged in the lexicographically smallest topological order keyed by
  `(ts, cid bytes)`. The policy a record X is judged under is the genesis policy with every
  accepted P-governance strict ancestor of X applied in that order (policy is causal: X is
  judged under the policy its author could see). A governance change that would leave no
  maintainer, or more than `MAX_MAINTAINERS`, is a no-op; adding a present maintainer or
  removing an absent one changes nothing.
- Votes on X are the validations with `project == G` and `target == X`, by maintainers of
  policy(X); a validator's latest validation (greatest `(ts, cid bytes)`) is the one that
  counts. An eligible author with no validation of their own record counts as accepting.
- X is accepted iff every parent is present and accepted (or inherited, or an admissible
  foreign record), accepts >= quorum and accepts > rejects; rejected iff not accepted,
  rejects >= quorum and rejects > accepts; otherwise pending. A record with a parent that
  is not present at all is pending (its policy cannot be known yet).

The restriction of the smallest topological order to X's ancestors depends only on those
ancestors, so a node that holds more unrelated records reaches the same policy for X.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal, TypeAlias

from ostrom.crypto.cid import CID
from ostrom.errors import InvalidInput
from ostrom.protocol.records import (
    MAX_MAINTAINERS,
    VERDICTS,
    Contribution,
    Governance,
    Policy,
    Project,
    SignedRecord,
    Validation,
    Verdict,
)

Status: TypeAlias = Literal["accepted", "rejected", "pending"]
STATUSES: Final = ("accepted", "rejected", "pending")

_EMPTY: Final[frozenset[bytes]] = frozenset()


@dataclass(frozen=True, slots=True)
class Vote:
    """One counted vote. `validation` is None for an author's implicit acceptance."""

    validator: bytes
    verdict: Verdict
    validation: CID | None
    ts: int

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise InvalidInput(f"a vote is accept or reject, not {self.verdict!r}")


@dataclass(frozen=True, slots=True)
class RecordStatus:
    """Where one record stands in a project.

    `votes` are the counted votes only (eligible validators, latest per validator), sorted
    by validator key. `waiting_on` lists parents that are present but not (yet) accepted;
    `missing` lists parents this node does not have at all. The two are disjoint.
    """

    cid: CID
    status: Status
    votes: tuple[Vote, ...]
    quorum: int
    accepts: int
    rejects: int
    waiting_on: tuple[CID, ...]
    missing: tuple[CID, ...]

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise InvalidInput(f"unknown status {self.status!r}")
        if self.accepts < 0 or self.rejects < 0 or self.quorum < 1:
            raise InvalidInput("vote counts are non-negative and quorum is at least 1")


@dataclass(frozen=True, slots=True)
class ProjectState:
    """The acceptance state of a project.

    `statuses` holds the genesis and every P-record, in judging order. `accepted` holds every
    DAG node accepted in the project: the genesis, inherited records, accepted P-records and
    the foreign records they include. `accepted_heads` are the accepted nodes with no
    accepted child, sorted by CID bytes: the tree of the project is the replay of these.
    """

    project: CID
    statuses: Mapping[CID, RecordStatus]
    policy: Policy
    accepted_heads: tuple[CID, ...]
    accepted: frozenset[CID]


class _Policies:
    """Policies keyed by the set of accepted governance records applied to the genesis one."""

    def __init__(self, genesis: Policy, position: Mapping[bytes, int]) -> None:
        self._genesis = genesis
        self._position = position
        self._governance: dict[bytes, Governance] = {}
        # The answer for a set: (eligible keys, quorum, policy). Governance is rare, so this
        # holds few entries even for a large project.
        self._cache: dict[frozenset[bytes], tuple[frozenset[bytes], int, Policy]] = {
            _EMPTY: (frozenset(genesis.maintainers), genesis.quorum, genesis)
        }
        # Equal sets share one object, so a node whose parents all carry the same set can
        # reuse it without comparing contents.
        self._interned: dict[frozenset[bytes], frozenset[bytes]] = {_EMPTY: _EMPTY}

    def add_governance(self, raw: bytes, body: Governance) -> None:
        self._governance[raw] = body

    def intern(self, value: frozenset[bytes]) -> frozenset[bytes]:
        return self._interned.setdefault(value, value)

    def get(self, applied: frozenset[bytes]) -> tuple[frozenset[bytes], int, Policy]:
        found = self._cache.get(applied)
        if found is None:
            found = self._apply(applied)
            self._cache[applied] = found
        return found

    def _apply(self, applied: frozenset[bytes]) -> tuple[frozenset[bytes], int, Policy]:
        maintainers = set(self._genesis.maintainers)
        quorum = self._genesis.quorum
        for raw in sorted(applied, key=self._position.__getitem__):
            change = self._governance[raw]
            if change.action == "set-quorum" and change.quorum is not None:
                quorum = change.quorum
            elif change.action == "add-maintainer" and change.key is not None:
                if len(maintainers) < MAX_MAINTAINERS:
                    maintainers.add(change.key)
            elif change.key is not None and len(maintainers) > 1:
                maintainers.discard(change.key)
        policy = Policy(maintainers=tuple(sorted(maintainers)), quorum=quorum)
        return frozenset(maintainers), quorum, policy


# A counted validation: (ts, cid bytes, verdict, cid); tuples compare by (ts, cid bytes).
_Ballot: TypeAlias = tuple[int, bytes, Verdict, CID]


@dataclass(slots=True)
class _Index:
    """The records that matter to one project, keyed by CID bytes (hashing bytes is cheap)."""

    nodes: dict[bytes, SignedRecord]  # DAG nodes: geneses, contributions, governance
    parents: dict[bytes, tuple[bytes, ...]]  # each node's parents, all of them
    others: set[bytes]  # present records that are not DAG nodes
    ballots: dict[bytes, dict[bytes, _Ballot]]  # target -> validator -> latest validation
    own: list[bytes]  # the P-records

    @classmethod
    def build(cls, genesis: SignedRecord, records: Iterable[SignedRecord]) -> _Index:
        g = genesis.cid
        index = cls({g.raw: genesis}, {g.raw: tuple(p.raw for p in genesis.parents)}, set(), {}, [])
        nodes, parents, ballots, own = index.nodes, index.parents, index.ballots, index.own
        for record in records:
            body = record.body
            raw = record.cid.raw
            if isinstance(body, (Contribution, Governance)):
                if raw not in nodes:
                    nodes[raw] = record
                    parents[raw] = tuple(p.raw for p in body.parents)
                    if body.project == g:
                        own.append(raw)
            elif isinstance(body, Project):
                if raw not in nodes:
                    nodes[raw] = record
                    parents[raw] = tuple(p.raw for p in body.parents)
            else:
                index.others.add(raw)
                if isinstance(body, Validation) and body.project == g:
                    by_validator = ballots.setdefault(body.target.raw, {})
                    ballot = (body.ts, raw, body.verdict, record.cid)
                    previous = by_validator.get(body.author)
                    if previous is None or ballot[:2] > previous[:2]:
                        by_validator[body.author] = ballot
        return index

    def ancestors(self, start: Iterable[bytes]) -> set[bytes]:
        """The present nodes among `start` and their present ancestors."""
        nodes, parents = self.nodes, self.parents
        seen: set[bytes] = set()
        stack = [raw for raw in start if raw in nodes]
        while stack:
            raw = stack.pop()
            if raw not in seen:
                seen.add(raw)
                stack.extend(p for p in parents[raw] if p in nodes and p not in seen)
        return seen

    def topological(self, relevant: set[bytes]) -> list[bytes]:
        """`relevant` (closed under present parents) in the smallest topological order by
        (ts, cid bytes): Kahn's algorithm with a heap."""
        nodes = self.nodes
        waiting: dict[bytes, int] = {}
        children: dict[bytes, list[bytes]] = {}
        ready: list[tuple[int, bytes]] = []
        for raw in relevant:
            count = 0
            for parent in self.parents[raw]:
                if parent in relevant:
                    count += 1
                    kids = children.get(parent)
                    if kids is None:
                        children[parent] = [raw]
                    else:
                        kids.append(raw)
            if count:
                waiting[raw] = count
            else:
                ready.append((nodes[raw].ts, raw))
        heapq.heapify(ready)
        order: list[bytes] = []
        while ready:
            raw = heapq.heappop(ready)[1]
            order.append(raw)
            for child in children.get(raw, ()):
                left = waiting[child] - 1
                waiting[child] = left
                if not left:
                    heapq.heappush(ready, (nodes[child].ts, child))
        return order


def _count_votes(
    record: SignedRecord,
    eligible: frozenset[bytes],
    ballots: Mapping[bytes, _Ballot] | None,
) -> tuple[tuple[Vote, ...], int, int]:
    author = record.author
    if not ballots:  # the common case: no validations yet
        if author in eligible:
            return (Vote(author, "accept", None, record.ts),), 1, 0
        return (), 0, 0
    votes: list[Vote] = []
    for validator, (ts, _, verdict, cid) in ballots.items():
        if validator in eligible:
            votes.append(Vote(validator, verdict, cid, ts))
    if author in eligible and author not in ballots:
        votes.append(Vote(author, "accept", None, record.ts))
    votes.sort(key=lambda vote: vote.validator)
    accepts = sum(1 for vote in votes if vote.verdict == "accept")
    return tuple(votes), accepts, len(votes) - accepts


def evaluate(genesis: SignedRecord, records: Iterable[SignedRecord]) -> ProjectState:
    """Judge every record of the project whose genesis is `genesis` (see the module doc).

    `records` may hold anything: other projects' records, needs, comments, duplicates.
    Runs in O(n log n) for n relevant records, iteratively (no recursion).
    """
    body = genesis.body
    if not isinstance(body, Project):
        raise InvalidInput(f"{genesis.cid} is a {genesis.type} record, not a project genesis")
    g = genesis.cid.raw
    index = _Index.build(genesis, records)
    nodes, parents_of, others, ballots = index.nodes, index.parents, index.others, index.ballots
    own = set(index.own)
    inherited = index.ancestors(parents_of[g])
    order = index.topological(index.ancestors([g, *own]))
    policies = _Policies(body.policy, {raw: i for i, raw in enumerate(order)})

    ok: set[bytes] = set()  # nodes that count as accepted parents in this project
    out_gov: dict[bytes, frozenset[bytes]] = {}  # the accepted governance a child of it sees
    statuses: dict[CID, RecordStatus] = {}
    accepted_governance: list[bytes] = []

    for raw in order:
        if raw in inherited:
            ok.add(raw)
            out_gov[raw] = _EMPTY
            continue
        parents = parents_of[raw]
        seen = _EMPTY
        all_ok = True
        for i, parent in enumerate(parents):
            if parent not in ok:
                all_ok = False
            parent_gov = out_gov.get(parent)
            if parent_gov is None:  # not present
                continue
            if not i:
                seen = parent_gov
            elif parent_gov is not seen:
                seen = policies.intern(seen | parent_gov)

        if raw not in own and raw != g:  # foreign
            if all_ok:
                ok.add(raw)
            out_gov[raw] = seen
            continue

        record = nodes[raw]
        eligible, quorum, _ = policies.get(seen)
        votes, accepts, rejects = _count_votes(record, eligible, ballots.get(raw))
        waiting_on: tuple[CID, ...] = ()
        missing: tuple[CID, ...] = ()
        if not all_ok:
            waiting: list[CID] = []
            lacking: list[CID] = []
            for cid in record.parents:  # sorted by CID bytes, as records require
                if cid.raw not in ok:
                    present = cid.raw in nodes or cid.raw in others
                    (waiting if present else lacking).append(cid)
            waiting_on, missing = tuple(waiting), tuple(lacking)
        status: Status
        if raw == g:
            status = "accepted"
        elif missing:
            status = "pending"
        elif all_ok and accepts >= quorum and accepts > rejects:
            status = "accepted"
        elif rejects >= quorum and rejects > accepts:
            status = "rejected"
        else:
            status = "pending"
        statuses[record.cid] = RecordStatus(
            record.cid, status, votes, quorum, accepts, rejects, waiting_on, missing
        )
        if status == "accepted":
            ok.add(raw)
            change = record.body
            if isinstance(change, Governance):
                policies.add_governance(raw, change)
                accepted_governance.append(raw)
                out_gov[raw] = policies.intern(seen | {raw})
                continue
        out_gov[raw] = seen

    accepted = _accepted_closure(index, ok, inherited, g)
    _, _, policy = policies.get(frozenset(accepted_governance))
    heads = accepted.difference(*(parents_of[raw] for raw in accepted))
    return ProjectState(
        project=genesis.cid,
        statuses=MappingProxyType(statuses),
        policy=policy,
        accepted_heads=tuple(nodes[raw].cid for raw in sorted(heads)),
        accepted=frozenset(nodes[raw].cid for raw in accepted),
    )


def _accepted_closure(index: _Index, ok: set[bytes], inherited: set[bytes], g: bytes) -> set[bytes]:
    """Genesis, inherited and accepted own records, and the foreign records they include."""
    stack = [raw for raw in index.own if raw in ok]
    accepted = {g, *inherited, *stack}
    parents_of = index.parents
    while stack:
        for parent in parents_of[stack.pop()]:
            # Parents of accepted records are all in `ok`; only foreign ones are left to add.
            if parent not in accepted:
                accepted.add(parent)
                stack.append(parent)
    return accepted
