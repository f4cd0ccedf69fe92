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
from dataclasses import dataclass, field
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
    statuses: MappingProxyType[CID, RecordStatus]
    policy: Policy
    accepted_heads: tuple[CID, ...]
    accepted: frozenset[CID]
    # What `advance` needs to judge new records without the project's other records, and
    # the context's version this state was made at (only the newest state may advance).
    _context: _Context | None = field(default=None, compare=False, repr=False)
    _version: int = field(default=0, compare=False, repr=False)

    def lacks_any(self, cids: Iterable[bytes]) -> bool:
        """Whether a record evaluated here names one of `cids` (binary) as a parent it does
        not have, which a new evaluation would then have to judge again (True when this
        state cannot tell)."""
        if self._context is None:
            return True
        lacking = self._context.lacking
        return any(raw in lacking for raw in cids)


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A record's status as `advance` changed it; `was` is None for a record new to the state."""

    cid: CID
    status: Status
    was: Status | None


@dataclass(slots=True, eq=False)
class _Context:
    """What an evaluation keeps so that `advance` can judge records that arrive later
    without the project's other records. Keys are the binary CIDs of the *evaluated* nodes:
    the genesis, its present ancestors, the P-records and the foreign records among their
    ancestors. `advance` changes it in place; `version` says which state may use it next.
    """

    genesis: bytes
    ok: set[bytes]  # evaluated nodes that count as accepted parents
    out_gov: dict[bytes, frozenset[bytes]]  # per evaluated node, what a child of it sees
    ballots: dict[bytes, dict[bytes, _Ballot]]  # every validation of the project, by target
    policies: _Policies
    lacking: set[bytes]  # parents of evaluated nodes that are not evaluated nodes
    waited: set[bytes]  # present parents that some P-record waits on
    foreign_parents: dict[bytes, tuple[bytes, ...]]  # each foreign evaluated node's parents
    accepted_foreign: set[bytes]  # the foreign nodes among the accepted ones
    max_key: tuple[int, bytes]  # the greatest (ts, cid bytes) of an evaluated node
    version: int = 0

    @classmethod
    def after(
        cls,
        index: _Index,
        g: bytes,
        order: list[bytes],
        ok: set[bytes],
        out_gov: dict[bytes, frozenset[bytes]],
        policies: _Policies,
        own: set[bytes],
        inherited: set[bytes],
        waited: set[bytes],
        accepted: set[bytes],
    ) -> _Context:
        parents_of, nodes = index.parents, index.nodes
        foreign = {
            raw: parents_of[raw]
            for raw in order
            if raw not in own and raw not in inherited and raw != g
        }
        lacking = {p for raw in order for p in parents_of[raw] if p not in out_gov}
        return cls(
            genesis=g,
            ok=ok,
            out_gov=out_gov,
            ballots=index.ballots,
            policies=policies,
            lacking=lacking,
            waited=waited,
            foreign_parents=foreign,
            accepted_foreign={raw for raw in foreign if raw in accepted},
            max_key=max(((nodes[raw].ts, raw) for raw in order), default=(0, b"")),
        )

    def seen_by(self, parents: Iterable[CID]) -> frozenset[bytes]:
        """The accepted governance a record with these parents is judged under (absent or
        unevaluated parents add none), as `evaluate` works it out."""
        seen = _EMPTY
        for gov in (self.out_gov.get(parent.raw) for parent in parents):
            if gov is not None and gov is not seen:
                seen = gov if seen is _EMPTY else self.policies.intern(seen | gov)
        return seen


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
    author: bytes,
    ts: int,
    eligible: frozenset[bytes],
    ballots: Mapping[bytes, _Ballot] | None,
) -> tuple[tuple[Vote, ...], int, int]:
    """The counted votes on a record by `author` made at `ts`, and how many accept and reject."""
    if not ballots:  # the common case: no validations yet
        if author in eligible:
            return (Vote(author, "accept", None, ts),), 1, 0
        return (), 0, 0
    votes: list[Vote] = []
    for validator, (cast_at, _, verdict, cid) in ballots.items():
        if validator in eligible:
            votes.append(Vote(validator, verdict, cid, cast_at))
    if author in eligible and author not in ballots:
        votes.append(Vote(author, "accept", None, ts))
    votes.sort(key=lambda vote: vote.validator)
    accepts = sum(1 for vote in votes if vote.verdict == "accept")
    return tuple(votes), accepts, len(votes) - accepts


def _judge(
    is_genesis: bool, lacks_parents: bool, parents_ok: bool, accepts: int, rejects: int, quorum: int
) -> Status:
    if is_genesis:
        return "accepted"
    if lacks_parents:
        return "pending"
    if parents_ok and accepts >= quorum and accepts > rejects:
        return "accepted"
    if rejects >= quorum and rejects > accepts:
        return "rejected"
    return "pending"


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
    # Positions matter only for ordering governance records (`_Policies._apply`).
    policies = _Policies(
        body.policy,
        {raw: i for i, raw in enumerate(order) if isinstance(nodes[raw].body, Governance)},
    )

    ok: set[bytes] = set()  # nodes that count as accepted parents in this project
    out_gov: dict[bytes, frozenset[bytes]] = {}  # the accepted governance a child of it sees
    statuses: dict[CID, RecordStatus] = {}
    accepted_governance: list[bytes] = []
    waited: set[bytes] = set()  # present parents that some P-record waits on

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
        votes, accepts, rejects = _count_votes(record.author, record.ts, eligible, ballots.get(raw))
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
            waited.update(cid.raw for cid in waiting)
        status = _judge(raw == g, bool(missing), all_ok, accepts, rejects, quorum)
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
    context = _Context.after(
        index, g, order, ok, out_gov, policies, own, inherited, waited, accepted
    )
    return ProjectState(
        project=genesis.cid,
        statuses=MappingProxyType(statuses),
        policy=policy,
        accepted_heads=tuple(nodes[raw].cid for raw in sorted(heads)),
        accepted=frozenset(nodes[raw].cid for raw in accepted),
        _context=context,
        _version=context.version,
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


def advance(
    state: ProjectState,
    records: Iterable[SignedRecord],
    targets: Mapping[CID, SignedRecord] | None = None,
) -> tuple[ProjectState, tuple[StatusChange, ...]] | None:
    """The state once `records` join the records `state` was evaluated from, and the
    statuses that changed; None when only a new `evaluate` can tell.

    It is what `evaluate` would return over all the records, worked out from the new ones:
    the cost is in proportion to them, not to the project. It handles what a busy project
    mostly receives: new contributions whose parents are all evaluated, made after every
    record evaluated so far (so they come last in the judging order), validations, and
    records that change nothing here. Anything else (governance, a record some evaluated
    record names as a parent it lacks, a validation that makes a record with children
    accepted or takes acceptance away, an older timestamp) returns None. `targets` holds
    the records validated by `records` that are not among them (their author, time and
    parents); a validation that changes the votes on a record not found there returns None.

    Only the newest state made from one evaluation can advance: `state` itself cannot
    advance a second time once this returned a new state or None.
    """
    context = state._context
    if context is None or context.version != state._version:
        return None
    result = _advance(state, context, list(records), targets or {})
    if result is None:
        context.version += 1  # perhaps applied in part: no state may advance with it now
    return result


def _advance(
    state: ProjectState,
    context: _Context,
    records: list[SignedRecord],
    targets: Mapping[CID, SignedRecord],
) -> tuple[ProjectState, tuple[StatusChange, ...]] | None:
    g = context.genesis
    lacking, out_gov, ok = context.lacking, context.out_gov, context.ok
    if any(record.cid.raw in lacking for record in records):
        return None
    by_cid = {record.cid: record for record in records}
    added: list[SignedRecord] = []
    votes: list[tuple[SignedRecord, Validation]] = []
    for record in records:
        body = record.body
        if isinstance(body, Validation):
            if body.project.raw == g:
                votes.append((record, body))
        elif isinstance(body, (Contribution, Governance)) and body.project.raw == g:
            if record.cid.raw in out_gov:
                continue  # already evaluated
            if isinstance(body, Governance):
                return None  # policies follow the judging order: evaluate again
            added.append(record)
        # Other records (needs, comments, other projects' records no evaluated node names)
        # change nothing here.
    if not added and not votes:
        return state, ()

    # `copy` of the read-only view copies its dict with each key's stored hash; `dict()` of
    # the view hashed every CID again, which made each step cost in proportion to the
    # project (25 ms a contribution at 30,000 records).
    statuses = state.statuses.copy()
    heads = set(state.accepted_heads)
    accepted_new: list[CID] = []
    changes: dict[CID, StatusChange] = {}  # one per record: where it was before the batch

    def accept(record: SignedRecord) -> None:
        """`record` is newly accepted and has no evaluated child: a head, with its parents'
        foreign ancestors that were not accepted yet."""
        ok.add(record.cid.raw)
        accepted_new.append(record.cid)
        heads.difference_update(record.parents)
        heads.add(record.cid)
        stack = [p.raw for p in record.parents]
        while stack:
            raw = stack.pop()
            parents = context.foreign_parents.get(raw)
            if parents is None or raw in context.accepted_foreign:
                continue
            context.accepted_foreign.add(raw)
            accepted_new.append(CID(raw))
            heads.difference_update(CID(p) for p in parents)
            stack.extend(parents)

    for record in sorted(added, key=lambda r: (r.ts, r.cid.raw)):
        key = (record.ts, record.cid.raw)
        if key <= context.max_key:
            return None  # it would not come last in the judging order
        if any(parent.raw not in out_gov for parent in record.parents):
            return None  # a parent that is absent, or was not evaluated
        parents_ok = all(parent.raw in ok for parent in record.parents)
        seen = context.seen_by(record.parents)
        eligible, quorum, _ = context.policies.get(seen)
        counted, accepts, rejects = _count_votes(
            record.author, record.ts, eligible, context.ballots.get(record.cid.raw)
        )
        waiting_on = tuple(p for p in record.parents if p.raw not in ok)
        status = _judge(False, False, parents_ok, accepts, rejects, quorum)
        statuses[record.cid] = RecordStatus(
            record.cid, status, counted, quorum, accepts, rejects, waiting_on, ()
        )
        out_gov[record.cid.raw] = seen
        context.max_key = key
        context.waited.update(p.raw for p in waiting_on)
        changes[record.cid] = StatusChange(record.cid, status, None)
        if status == "accepted":
            accept(record)

    for record, body in votes:
        by_validator = context.ballots.setdefault(body.target.raw, {})
        ballot = (record.ts, record.cid.raw, body.verdict, record.cid)
        previous = by_validator.get(body.author)
        if previous is not None and ballot[:2] <= previous[:2]:
            continue  # an older (or the same) validation by this validator
        by_validator[body.author] = ballot
        old = statuses.get(body.target)
        if old is None:
            continue  # no status here: absent, inherited or foreign
        target = by_cid.get(body.target) or targets.get(body.target)
        if target is None or isinstance(target.body, Governance):
            return None
        seen = context.seen_by(target.parents)
        eligible, quorum, _ = context.policies.get(seen)
        counted, accepts, rejects = _count_votes(target.author, target.ts, eligible, by_validator)
        parents_ok = not old.waiting_on and not old.missing
        is_genesis = target.cid.raw == g
        status = _judge(is_genesis, bool(old.missing), parents_ok, accepts, rejects, quorum)
        statuses[target.cid] = RecordStatus(
            target.cid, status, counted, quorum, accepts, rejects, old.waiting_on, old.missing
        )
        if status == old.status:
            continue
        if old.status == "accepted" or target.cid.raw in context.waited:
            return None  # acceptance taken away, or records wait on this one
        if any(target.cid.raw in parents for parents in context.foreign_parents.values()):
            return None  # a foreign record that includes it may become accepted
        earlier = changes.get(target.cid)
        was = old.status if earlier is None else earlier.was
        changes[target.cid] = StatusChange(target.cid, status, was)
        if status == "accepted":
            accept(target)

    context.version += 1  # the context now describes the new state only
    return (
        ProjectState(
            project=state.project,
            statuses=MappingProxyType(statuses),
            policy=state.policy,
            accepted_heads=tuple(sorted(heads)),
            accepted=state.accepted.union(accepted_new) if accepted_new else state.accepted,
            _context=context,
            _version=context.version,
        ),
        tuple(change for change in changes.values() if change.status != change.was),
    )
