"""Tree replay (ostrom/protocol/tree.py): the files at a set of heads, and their conflicts."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ostrom.crypto.cid import CID
from ostrom.errors import InvalidInput, NotFound
from ostrom.protocol.changesets import Changeset, Put
from ostrom.protocol.paths import parent_dirs
from ostrom.protocol.records import Contribution, SignedRecord
from ostrom.protocol.tree import Conflict, FileEntry, Tree, replay
from tests.dagfactory import World, file_cid, identity

ALICE = identity("alice")
BOB = identity("bob")


def contents(tree: Tree) -> dict[str, CID]:
    return {path: entry.file for path, entry in tree.files.items()}


def by_cid(*records: SignedRecord) -> tuple[CID, ...]:
    return tuple(sorted((r.cid for r in records), key=lambda c: c.raw))


def test_a_linear_history_overwrites_and_deletes() -> None:
    world = World()
    g = world.genesis(ALICE)
    c1 = world.contribute(ALICE, g, [g], {"a.txt": "one", "b.txt": "bee", "src/m.py": "x"})
    c2 = world.contribute(ALICE, g, [c1], {"a.txt": "two", "b.txt": None})
    tree = world.replay([c2])
    assert tree.conflicts == ()
    assert list(tree.files) == ["a.txt", "src/m.py"]
    assert tree.files["a.txt"] == FileEntry("a.txt", file_cid("two"), 3, False, c2.cid)
    assert tree.files["src/m.py"].record == c1.cid
    assert contents(world.replay([c1])) == {
        "a.txt": file_cid("one"),
        "b.txt": file_cid("bee"),
        "src/m.py": file_cid("x"),
    }
    assert world.replay([g]).files == {}


def test_later_changesets_of_one_contribution_override_earlier_ones() -> None:
    world = World()
    g = world.genesis(ALICE)
    c1 = world.contribute(ALICE, g, [g], [{"a": "first", "b": "bee"}, {"a": "second"}])
    assert contents(world.replay([c1])) == {"a": file_cid("second"), "b": file_cid("bee")}


def test_exec_bit_is_kept() -> None:
    world = World()
    g = world.genesis(ALICE)
    c1 = world.contribute(ALICE, g, [g], {"run.sh": "#!/bin/sh"}, exec=True)
    assert world.replay([c1]).files["run.sh"].exec is True


def test_concurrent_writes_conflict_and_the_latest_wins_in_any_order() -> None:
    world = World()
    g = world.genesis(ALICE)
    early = world.contribute(ALICE, g, [g], {"a": "alice"}, ts=10_000)
    late = world.contribute(BOB, g, [g], {"a": "bob"}, ts=20_000)
    expected = Conflict("a", by_cid(early, late), late.cid)
    for heads in ([early, late], [late, early]):
        shuffled = dict(reversed(list(world.records.items())))
        tree = replay([h.cid for h in heads], shuffled, world.changeset)
        assert tree.conflicts == (expected,)
        assert tree.files["a"] == FileEntry("a", file_cid("bob"), 3, False, late.cid)


def test_equal_timestamps_are_broken_by_cid() -> None:
    world = World()
    g = world.genesis(ALICE)
    one = world.contribute(ALICE, g, [g], {"a": "alice"}, ts=10_000)
    two = world.contribute(BOB, g, [g], {"a": "bob"}, ts=10_000)
    winner = max(one, two, key=lambda r: r.cid.raw)
    assert world.replay([one, two]).conflicts[0].chosen == winner.cid
    assert world.replay([one, two]).files["a"].record == winner.cid


def test_a_winning_concurrent_delete_removes_the_path() -> None:
    world = World()
    g = world.genesis(ALICE)
    c1 = world.contribute(ALICE, g, [g], {"a": "v1"})
    edit = world.contribute(ALICE, g, [c1], {"a": "v2"}, ts=30_000)
    delete = world.contribute(BOB, g, [c1], {"a": None}, ts=40_000)
    tree = world.replay([edit, delete])
    assert "a" not in tree.files
    assert tree.conflicts == (Conflict("a", by_cid(edit, delete), delete.cid),)


def test_a_different_exec_bit_is_a_conflict() -> None:
    world = World()
    g = world.genesis(ALICE)
    plain = world.contribute(ALICE, g, [g], {"x": "same"})
    executable = world.contribute(BOB, g, [g], {"x": "same"}, exec=True)
    assert [c.path for c in world.replay([plain, executable]).conflicts] == ["x"]


def test_identical_concurrent_writes_are_not_a_conflict() -> None:
    world = World()
    g = world.genesis(ALICE)
    one = world.contribute(ALICE, g, [g], {"a": "same", "gone": None}, ts=10_000)
    two = world.contribute(BOB, g, [g], {"a": "same", "gone": None}, ts=20_000)
    tree = world.replay([one, two])
    assert tree.conflicts == ()
    assert tree.files["a"].record == two.cid
    assert "gone" not in tree.files


def test_a_merge_that_writes_the_path_resolves_the_conflict() -> None:
    world = World()
    g = world.genesis(ALICE)
    one = world.contribute(ALICE, g, [g], {"a": "alice", "b": "b1"})
    two = world.contribute(BOB, g, [g], {"a": "bob", "b": "b2"})
    merge = world.contribute(ALICE, g, [one, two], {"a": "both"})
    tree = world.replay([merge])
    assert tree.files["a"] == FileEntry("a", file_cid("both"), 4, False, merge.cid)
    # The merge left b alone: that conflict stands.
    assert [c.path for c in tree.conflicts] == ["b"]
    after = world.contribute(ALICE, g, [merge], {"c": "new"})
    assert [c.path for c in world.replay([after]).conflicts] == ["b"]


def test_a_write_after_a_merge_supersedes_both_sides() -> None:
    world = World()
    g = world.genesis(ALICE)
    one = world.contribute(ALICE, g, [g], {"a": "alice"})
    two = world.contribute(BOB, g, [g], {"a": "bob"})
    merge = world.contribute(ALICE, g, [one, two])
    fix = world.contribute(ALICE, g, [merge], {"a": "fixed"})
    tree = world.replay([fix])
    assert tree.conflicts == ()
    assert tree.files["a"].record == fix.cid


def test_a_file_that_is_also_a_directory_loses_to_the_directory() -> None:
    world = World()
    g = world.genesis(ALICE)
    file = world.contribute(ALICE, g, [g], {"a": "a file"}, ts=50_000)
    directory = world.contribute(BOB, g, [g], {"a/b": "inside", "a/c/d": "deeper"}, ts=10_000)
    tree = world.replay([file, directory])
    assert list(tree.files) == ["a/b", "a/c/d"]
    assert tree.conflicts == (Conflict("a", by_cid(file, directory), directory.cid),)


def test_nested_file_directory_clashes_each_report() -> None:
    world = World()
    g = world.genesis(ALICE)
    c1 = world.contribute(ALICE, g, [g], {"a": "1", "a/b": "2", "a/b/c": "3"})
    tree = world.replay([c1])
    assert list(tree.files) == ["a/b/c"]
    assert [(c.path, c.candidates, c.chosen) for c in tree.conflicts] == [
        ("a", (c1.cid,), c1.cid),
        ("a/b", (c1.cid,), c1.cid),
    ]


def test_a_fork_replays_upstream_history_and_merged_upstream_work() -> None:
    world = World()
    up = world.genesis(ALICE, name="upstream")
    u1 = world.contribute(ALICE, up, [up], {"README": "upstream", "lib.py": "v1"})
    fork = world.fork(BOB, up, [u1])
    f1 = world.contribute(BOB, fork, [fork], {"README": "fork"})
    u2 = world.contribute(ALICE, up, [u1], {"lib.py": "v2"})
    merge = world.contribute(BOB, fork, [f1, u2])
    tree = world.replay([merge])
    assert tree.conflicts == ()
    assert contents(tree) == {"README": file_cid("fork"), "lib.py": file_cid("v2")}
    assert tree.files["lib.py"].record == u2.cid


def test_missing_records_and_changesets_raise_not_found_naming_them() -> None:
    world = World()
    g = world.genesis(ALICE)
    c1 = world.contribute(ALICE, g, [g], {"a": "x"})
    c2 = world.contribute(ALICE, g, [c1], {"a": "y"})
    without_c1 = {cid: r for cid, r in world.records.items() if cid != c1.cid}
    with pytest.raises(NotFound, match=str(c1.cid)):
        replay([c2.cid], without_c1, world.changeset)
    with pytest.raises(NotFound, match=str(c2.cid)):
        replay([c2.cid], {}, world.changeset)
    body = c2.body
    assert isinstance(body, Contribution)
    lost = body.changes[0]
    partial = {k: v for k, v in world.changesets.items() if k != lost}
    with pytest.raises(NotFound, match=str(lost)):  # a lookup that raises KeyError
        replay([c2.cid], world.records, partial.__getitem__)
    del world.changesets[lost]
    with pytest.raises(NotFound, match=str(lost)):  # a lookup that raises NotFound itself
        replay([c2.cid], world.records, world.changeset)


def test_records_under_the_wrong_cid_are_refused() -> None:
    world = World()
    g = world.genesis(ALICE)
    c1 = world.contribute(ALICE, g, [g])
    with pytest.raises(InvalidInput):
        replay([c1.cid], {c1.cid: g, g.cid: g}, world.changeset)


def test_no_heads_is_an_empty_tree() -> None:
    assert replay([], {}, World().changeset) == Tree(files={}, conflicts=())


def test_a_long_chain_does_not_recurse() -> None:
    world = World()
    g = world.genesis(ALICE)
    head = world.contribute(ALICE, g, [g], {f"f{i}": "0" for i in range(50)})
    for i in range(3000):
        head = world.contribute(ALICE, g, [head], {f"f{i % 50}": str(i)})
    tree = world.replay([head])
    assert tree.conflicts == ()
    assert tree.files["f49"].file == file_cid("2999")


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["chain", "wide"])
def test_a_hundred_thousand_contributions(shape: str) -> None:
    world = World()
    g = world.genesis(ALICE)
    base = world.contribute(ALICE, g, [g], {f"f{i}": "0" for i in range(1000)})
    made = [base]
    for i in range(100_000):
        parent = made[-1] if shape == "chain" else base
        made.append(world.contribute(ALICE, g, [parent], {f"f{i % 1000}": str(i)}))
    tree = world.replay(made[-1:] if shape == "chain" else made[1:])
    assert len(tree.files) == 1000
    assert len(tree.conflicts) == (0 if shape == "chain" else 1000)


# --- a reference implementation, and random DAGs ------------------------------------------------


def reference(
    heads: Iterable[CID], records: Mapping[CID, SignedRecord], changesets: Mapping[CID, Changeset]
) -> Tree:
    """The rule as written, quadratic and obvious: the oracle for random DAGs."""

    def ancestors(c: CID) -> set[CID]:
        seen: set[CID] = set()
        todo = list(records[c].parents)
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.add(p)
                todo.extend(records[p].parents)
        return seen

    nodes = set(heads)
    for h in heads:
        nodes |= ancestors(h)
    strict = {c: ancestors(c) for c in nodes}
    writes: dict[str, list[tuple[CID, object]]] = {}
    for c in nodes:
        body = records[c].body
        if not isinstance(body, Contribution):
            continue
        values: dict[str, object] = {}
        for link in body.changes:
            for ch in changesets[link].changes:
                values[ch.path] = (ch.file, ch.size, ch.exec) if isinstance(ch, Put) else None
        for path, value in values.items():
            writes.setdefault(path, []).append((c, value))

    def rank(write: tuple[CID, object]) -> tuple[int, bytes]:
        return records[write[0]].ts, write[0].raw

    def key(value: object) -> object:
        return None if value is None else (value[0], value[2])  # type: ignore[index]

    live: dict[str, tuple[CID, object]] = {}
    conflicts: dict[str, Conflict] = {}
    for path, ws in writes.items():
        top = [w for w in ws if not any(w[0] in strict[o[0]] for o in ws)]
        best = max(top, key=rank)
        if len({key(w[1]) for w in top}) > 1:
            cands = tuple(sorted((w[0] for w in top), key=lambda c: c.raw))
            conflicts[path] = Conflict(path, cands, best[0])
        if best[1] is not None:
            live[path] = best
    shadowed = {d for p in live for d in parent_dirs(p) if d in live}
    for d in shadowed:
        under = [w for p, w in live.items() if p.startswith(d + "/") and p not in shadowed]
        chosen = max(under, key=rank)[0]
        cands = {live[d][0], chosen} | set(conflicts[d].candidates if d in conflicts else ())
        conflicts[d] = Conflict(d, tuple(sorted(cands, key=lambda c: c.raw)), chosen)
    files = {}
    for p in sorted(set(live) - shadowed):
        c, (file, size, exec_) = live[p]  # type: ignore[misc]
        files[p] = FileEntry(p, file, size, exec_, c)
    return Tree(files=files, conflicts=tuple(conflicts[p] for p in sorted(conflicts)))


PATHS = ("a", "a/b", "a/c", "b", "b/x/y")
VALUES = ("one", "two", None)


@st.composite
def random_histories(draw: st.DrawFn) -> tuple[World, list[CID]]:
    """Random DAGs of contributions (with merges and small ts ranges for ties)."""
    world = World()
    g = world.genesis(ALICE, ts=0)
    nodes: list[SignedRecord] = [g]
    for _ in range(draw(st.integers(min_value=1, max_value=14))):
        parents = draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=3))
        batches = draw(
            st.lists(
                st.dictionaries(st.sampled_from(PATHS), st.sampled_from(VALUES), max_size=3),
                max_size=2,
            )
        )
        nodes.append(
            world.contribute(
                draw(st.sampled_from([ALICE, BOB])),
                g,
                parents,
                batches,
                exec=draw(st.booleans()),
                ts=draw(st.integers(min_value=1, max_value=5)),
            )
        )
    heads = draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=4))
    return world, [h.cid for h in heads]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_histories(), st.randoms(use_true_random=False))
def test_random_histories_follow_the_rule_in_any_order(
    history: tuple[World, list[CID]], rng: random.Random
) -> None:
    world, heads = history
    tree = world.replay(heads)
    assert tree == reference(heads, world.records, world.changesets)
    items = list(world.records.items())
    rng.shuffle(items)
    shuffled_heads = list(heads)
    rng.shuffle(shuffled_heads)
    assert replay(shuffled_heads, dict(items), world.changeset) == tree
    assert list(tree.files) == sorted(tree.files)
