"""`acceptance.advance`: a state moved forward by new records equals a new evaluation."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ostrom.crypto.cid import CID
from ostrom.protocol.acceptance import ProjectState, StatusChange, advance, evaluate
from ostrom.protocol.records import Need, SignedRecord, sign
from tests.dagfactory import World, identity
from tests.test_acceptance import random_projects

ALICE = identity("alice")
BOB = identity("bob")
CAROL = identity("carol")
PEOPLE = (ALICE, BOB, CAROL)


def same(advanced: ProjectState, evaluated: ProjectState) -> None:
    """Equal in every field, and the statuses in the same (judging) order."""
    assert advanced == evaluated
    assert list(advanced.statuses.items()) == list(evaluated.statuses.items())


def changes_between(old: ProjectState, new: ProjectState) -> set[StatusChange]:
    changes = set()
    for cid, status in new.statuses.items():
        was = old.statuses.get(cid)
        if was is None or was.status != status.status:
            changes.add(StatusChange(cid, status.status, None if was is None else was.status))
    return changes


def replay_arrivals(
    genesis: SignedRecord, arrivals: list[list[SignedRecord]], everything: list[SignedRecord]
) -> int:
    """Feed `arrivals` batch by batch, advancing where possible and checking each step
    against `evaluate` over everything so far; returns how many steps advanced."""
    by_cid = {record.cid: record for record in everything}
    held = [genesis]
    state = evaluate(genesis, held)
    advanced = 0
    for batch in arrivals:
        held.extend(batch)
        expected = evaluate(genesis, held)
        targets: dict[CID, SignedRecord] = {
            cid: by_cid[cid] for cid in state.statuses if cid in by_cid
        }
        result = advance(state, batch, targets)
        if result is None:
            state = expected
            continue
        new, changes = result
        same(new, expected)
        assert set(changes) == changes_between(state, new)
        assert len(changes) == len(set(changes))
        state = new
        advanced += 1
    return advanced


@st.composite
def growing_projects(draw: st.DrawFn) -> tuple[SignedRecord, list[SignedRecord]]:
    """A project as a busy topic sees it: records made one after another (timestamps rise),
    mostly contributions on recent heads and validations, with the odd governance record,
    need, vote change and fork that merges back."""
    world = World()
    quorum = draw(st.integers(min_value=1, max_value=2))
    g = world.genesis(ALICE, maintainers=[ALICE, BOB], quorum=quorum)
    dag = [g]
    fork: SignedRecord | None = None
    for _ in range(draw(st.integers(min_value=3, max_value=30))):
        kind = draw(
            st.sampled_from(
                ["contribute"] * 5 + ["validate"] * 4 + ["govern", "need", "fork", "merge"]
            )
        )
        author = draw(st.sampled_from(PEOPLE))
        recent = dag[-4:]
        if kind == "contribute":
            parents = draw(st.lists(st.sampled_from(recent), min_size=1, max_size=2))
            dag.append(world.contribute(author, g, parents))
        elif kind == "validate":
            target = draw(st.sampled_from(recent))
            verdict = draw(st.sampled_from(["accept", "accept", "reject"]))
            world.validate(author, target, verdict, project=g)  # type: ignore[arg-type]
        elif kind == "govern":
            dag.append(world.govern(author, g, [dag[-1]], "set-quorum", quorum=quorum))
        elif kind == "need":
            need = Need(author=author.public_key, ts=world.tick(), project=g.cid, title="help")
            world.records[sign(need, author).cid] = sign(need, author)
        elif kind == "fork" and fork is None:
            fork = world.fork(author, g, [dag[-1]])
            dag.append(world.contribute(author, fork, [fork]))
        elif kind == "merge" and fork is not None:
            fork_heads = [r for r in dag if r.project == fork.cid][-1:]
            dag.append(world.contribute(author, g, [dag[-1], *fork_heads]))
    return g, list(world.records.values())


def batches(draw: st.DrawFn, records: list[SignedRecord]) -> list[list[SignedRecord]]:
    out: list[list[SignedRecord]] = []
    i = 0
    while i < len(records):
        size = draw(st.integers(min_value=1, max_value=3))
        out.append(records[i : i + size])
        i += size
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(growing_projects(), st.data())
def test_records_in_the_order_they_were_made(
    project: tuple[SignedRecord, list[SignedRecord]], data: st.DataObject
) -> None:
    g, records = project
    rest = [r for r in records if r != g]
    replay_arrivals(g, batches(data.draw, rest), records)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_projects(), st.randoms(use_true_random=False), st.data())
def test_records_in_any_order(
    projects: tuple[SignedRecord, SignedRecord, list[SignedRecord]],
    rng: random.Random,
    data: st.DataObject,
) -> None:
    up, fork, records = projects
    for genesis in (up, fork):
        rest = [r for r in records if r != genesis]
        rng.shuffle(rest)
        replay_arrivals(genesis, batches(data.draw, rest + rest[:2]), records)


def test_a_busy_project_advances_without_evaluating_again() -> None:
    """Contributions on the head, each accepted by a second maintainer: every step advances
    and reports the statuses a subscriber is told."""
    world = World()
    g = world.genesis(ALICE, maintainers=[ALICE, BOB], quorum=2)
    arrivals: list[list[SignedRecord]] = []
    head = g
    for i in range(40):
        head = world.contribute(ALICE, g, [head], {"page": f"revision {i}"})
        arrivals.append([head])
        arrivals.append([world.validate(BOB, head)])
    records = list(world.records.values())
    assert replay_arrivals(g, arrivals, records) == len(arrivals)

    state = evaluate(g, [g])
    first = world.records[arrivals[0][0].cid]
    result = advance(state, [first])
    assert result is not None
    new, changes = result
    assert changes == (StatusChange(first.cid, "pending", None),)
    result = advance(new, [world.records[arrivals[1][0].cid]], {first.cid: first})
    assert result is not None
    assert result[1] == (StatusChange(first.cid, "accepted", "pending"),)
    assert result[0].accepted_heads == (first.cid,)


def test_a_state_advances_once() -> None:
    """Advancing shares the evaluation's bookkeeping, so a superseded state cannot advance
    again (it would see records it was not made from); it asks for an evaluation instead."""
    world = World()
    g = world.genesis(ALICE)
    one = world.contribute(ALICE, g, [g])
    two = world.contribute(ALICE, g, [g])
    state = evaluate(g, [g])
    assert advance(state, [one]) is not None
    assert advance(state, [two]) is None


def test_what_it_cannot_tell_it_leaves_to_evaluate() -> None:
    world = World()
    g = world.genesis(ALICE, maintainers=[ALICE, BOB], quorum=2)
    c1 = world.contribute(CAROL, g, [g])
    c2 = world.contribute(CAROL, g, [c1])
    gov = world.govern(ALICE, g, [g], "set-quorum", quorum=1)
    state = evaluate(g, [g, c1, c2])
    # Governance changes policies by the judging order.
    assert advance(state, [gov]) is None
    # Accepting a record that another waits on changes the waiting one too.
    state = evaluate(g, [g, c1, c2])
    one, two = world.validate(ALICE, c1), world.validate(BOB, c1)
    assert advance(state, [one, two], {c1.cid: c1}) is None
    # A record some record lacks completes its ancestry.
    state = evaluate(g, [g, c2])
    assert advance(state, [c1]) is None
    # An older record would be judged before newer ones.
    state = evaluate(g, [g, c2, c1])
    older = world.contribute(ALICE, g, [g], ts=c1.ts - 1)
    assert advance(state, [older]) is None
