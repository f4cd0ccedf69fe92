"""Range-based set reconciliation: the index, the wire format and whole sessions.

Sessions run as a deterministic simulation: two `Reconciler`s exchange messages through
`encode_message` / `decode_message`, and the test checks that both sides end knowing the exact
difference, that no message is over its bound and that the session stays within its round bound.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ostrom.crypto.cid import CID
from ostrom.errors import DecodeError, InvalidInput, TooLarge
from ostrom.protocol.reconcile import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FINGERPRINT_LENGTH,
    ID_LENGTH,
    INFINITY,
    MAX_ID_LIST,
    MAX_RANGES,
    MESSAGE_VERSION,
    Fingerprint,
    IdDiff,
    IdList,
    Message,
    ReconcileIndex,
    Reconciler,
    Skip,
    decode_message,
    encode_message,
    fingerprint,
    separator,
)

PREFIX = bytes([1, 0x71, 0x12, 0x20])  # a binary CIDv1 dag-cbor sha2-256, before its digest
# A session that is still going after this many messages is a failure, not a slow exchange.
MESSAGE_LIMIT = 10_000


def random_ids(count: int, rng: random.Random) -> list[bytes]:
    return [PREFIX + rng.randbytes(32) for _ in range(count)]


def near_ids(count: int, rng: random.Random, *, random_tail: int = 0) -> list[bytes]:
    """Ids that share long prefixes, so that bounds of every length up to 36 bytes occur.

    Ids that differ in a few bytes set to 0, 1, 0xFE or 0xFF often form two different sets
    with the same sum, which the additive fingerprint cannot tell apart (PROTOCOL.md 11.4.7:
    real ids are digests, where that takes a deliberate search). `random_tail` random last
    bytes make such sums as unlikely as for digests while keeping the prefixes long.
    """
    base = bytearray(rng.randbytes(32))
    out: set[bytes] = set()
    while len(out) < count:
        digest = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            position = min(31, int(rng.expovariate(0.15)))
            digest[31 - position] = rng.choice((0, 1, 0xFE, 0xFF, rng.randrange(256)))
        if random_tail:
            digest[-random_tail:] = rng.randbytes(random_tail)
        out.add(PREFIX + bytes(digest))
    return sorted(out)


@dataclass
class Outcome:
    initiator: Reconciler
    responder: Reconciler
    bytes: int
    messages: int


def sync(a: list[bytes], b: list[bytes], **options: int) -> Outcome:
    """Run a whole session, A initiating, through the wire format."""
    max_bytes = options.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
    alice = Reconciler(ReconcileIndex.build(a), initiator=True, **options)
    bob = Reconciler(ReconcileIndex.build(b), initiator=False, **options)
    total = messages = 0
    message: Message | None = alice.start()
    receiver = bob
    while message is not None:
        data = encode_message(message)
        assert len(data) <= max_bytes
        total += len(data)
        messages += 1
        assert messages < MESSAGE_LIMIT
        message = receiver.receive(decode_message(data, max_bytes=max_bytes))
        receiver = alice if receiver is bob else bob
    return Outcome(alice, bob, total, messages)


def check_outcome(outcome: Outcome, a: list[bytes], b: list[bytes]) -> None:
    alice, bob = outcome.initiator, outcome.responder
    set_a, set_b = set(a), set(b)
    assert alice.done and bob.done
    assert alice.need == set_b - set_a
    assert alice.have == set_a - set_b
    assert bob.need == set_a - set_b
    assert bob.have == set_b - set_a
    for side in (alice, bob):
        assert side.rounds <= side.round_limit()


# --- whole sessions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shared", "only_a", "only_b"),
    [
        (0, 0, 0),  # both empty
        (0, 3000, 0),  # one side empty
        (0, 0, 3000),
        (3000, 0, 0),  # identical
        (0, 1500, 1500),  # disjoint
        (2000, 0, 500),  # A is a subset of B
        (2000, 500, 0),  # B is a subset of A
        (10, 1, 1),
        (5000, 5, 5),
    ],
)
def test_sessions_learn_the_exact_difference(shared: int, only_a: int, only_b: int) -> None:
    rng = random.Random(shared * 7 + only_a * 3 + only_b)
    common = random_ids(shared, rng)
    a = common + random_ids(only_a, rng)
    b = common + random_ids(only_b, rng)
    check_outcome(sync(a, b), a, b)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shared=st.integers(0, 3000),
    only_a=st.integers(0, 400) | st.sampled_from([0, 1, 2000]),
    only_b=st.integers(0, 400) | st.sampled_from([0, 1, 2000]),
    seed=st.integers(0, 2**32),
    near=st.booleans(),
    max_message_bytes=st.sampled_from([4096, 8192, DEFAULT_MAX_MESSAGE_BYTES]),
    branching=st.sampled_from([2, 4, 16, 64]),
    leaf_size=st.sampled_from([1, 4, 16, 64]),
)
def test_any_two_sets_reconcile(
    shared: int,
    only_a: int,
    only_b: int,
    seed: int,
    near: bool,
    max_message_bytes: int,
    branching: int,
    leaf_size: int,
) -> None:
    rng = random.Random(seed)
    count = shared + only_a + only_b
    # Whole sessions rest on fingerprints telling different sets apart; see `near_ids`.
    pool = near_ids(count, rng, random_tail=4) if near else random_ids(count, rng)
    rng.shuffle(pool)
    common, rest = pool[:shared], pool[shared:]
    a, b = common + rest[:only_a], common + rest[only_a:]
    try:
        outcome = sync(
            a, b, max_message_bytes=max_message_bytes, branching=branching, leaf_size=leaf_size
        )
    except InvalidInput:
        assume(False)  # a message bound too small for these settings; refused up front
        raise
    check_outcome(outcome, a, b)


def test_identical_sets_take_one_round_trip_of_a_few_bytes() -> None:
    ids = random_ids(10_000, random.Random(1))
    outcome = sync(ids, list(reversed(ids)))
    assert outcome.messages == 2
    assert outcome.bytes <= 1 + 1 + FINGERPRINT_LENGTH + 1


def test_ten_differences_in_ten_thousand_cost_a_few_kilobytes() -> None:
    rng = random.Random(2)
    common = random_ids(10_000, rng)
    a, b = common + random_ids(5, rng), common + random_ids(5, rng)
    outcome = sync(a, b)
    check_outcome(outcome, a, b)
    # Measured 7.3 KB over 6 messages; sending A's ids alone would take 360 KB.
    assert outcome.bytes <= 8 * 1024
    assert outcome.messages <= 8


def test_everything_against_nothing_costs_about_the_ids_themselves() -> None:
    ids = random_ids(10_000, random.Random(3))
    for a, b in ((ids, []), ([], ids)):
        outcome = sync(a, b)
        check_outcome(outcome, a, b)
        assert outcome.bytes <= len(ids) * ID_LENGTH * 1.01


def test_large_messages_stop_at_the_range_limit() -> None:
    # With a 1 MiB bound, the count of ranges (not bytes) is what fills a message up.
    rng = random.Random(21)
    common = random_ids(20_000, rng)
    a, b = common + random_ids(2000, rng), common + random_ids(2000, rng)
    options = {"max_message_bytes": 1 << 20, "leaf_size": 1}
    alice = Reconciler(ReconcileIndex.build(a), initiator=True, **options)
    bob = Reconciler(ReconcileIndex.build(b), initiator=False, **options)
    message: Message | None = alice.start()
    receiver, most = bob, 0
    while message is not None:
        most = max(most, len(message.ranges))
        assert receiver.rounds < MESSAGE_LIMIT
        data = encode_message(message)
        message = receiver.receive(decode_message(data, max_bytes=1 << 20))
        receiver = alice if receiver is bob else bob
    assert MAX_RANGES - 2 <= most <= MAX_RANGES
    check_outcome(Outcome(alice, bob, 0, 0), a, b)


def test_real_record_cids() -> None:
    a = [CID.of_dag_cbor(bytes([i % 256, i // 256])).raw for i in range(3000)]
    b = a[100:] + [CID.of_raw(b"block %d" % i).raw for i in range(20)]
    check_outcome(sync(a, b), a, b)


def test_ids_added_during_a_session_are_learned_or_left_for_the_next() -> None:
    rng = random.Random(4)
    common = random_ids(5000, rng)
    a_only, b_only, late = random_ids(20, rng), random_ids(20, rng), random_ids(30, rng)
    index_a = ReconcileIndex.build(common + a_only)
    alice = Reconciler(index_a, initiator=True)
    bob = Reconciler(ReconcileIndex.build(common + b_only), initiator=False)
    message: Message | None = alice.start()
    receiver = bob
    count = 0
    while message is not None:
        if count < len(late):
            index_a.add(late[count])
        count += 1
        assert count < MESSAGE_LIMIT
        message = receiver.receive(decode_message(encode_message(message)))
        receiver = alice if receiver is bob else bob
    assert set(a_only) <= alice.have <= set(a_only) | set(late)
    assert alice.need == set(b_only) == bob.have
    assert bob.need == alice.have


# --- hostile and broken peers --------------------------------------------------------------------


def test_a_peer_that_never_agrees_is_cut_off_at_the_round_bound() -> None:
    index = ReconcileIndex.build(random_ids(100_000 // 10, random.Random(5)))
    victim = Reconciler(index, initiator=False)
    limit = victim.round_limit()
    rng = random.Random(6)
    with pytest.raises(TooLarge):
        for _ in range(limit + 1):
            reply = victim.receive(Message((Fingerprint(INFINITY, rng.randbytes(16)),)))
            assert reply is not None and reply.asks
    assert victim.rounds == limit + 1
    assert limit <= 30  # 2 * (levels(10,000) = 3 + ROUND_SLACK)


def test_a_peer_offering_endless_ids_is_cut_off() -> None:
    mine = random_ids(3, random.Random(7))
    victim = Reconciler(ReconcileIndex.build(mine), initiator=True, max_need=100)
    first = victim.start()
    assert first.ranges == (IdList(INFINITY, tuple(sorted(mine))),)
    invented = tuple(sorted(random_ids(101, random.Random(8))))
    with pytest.raises(TooLarge):
        victim.receive(Message((IdDiff(INFINITY, (False, False, False), invented),)))


def test_an_answer_to_nothing_asked_is_refused() -> None:
    victim = Reconciler(ReconcileIndex.build(random_ids(100, random.Random(9))), initiator=False)
    with pytest.raises(DecodeError):
        victim.receive(Message((IdDiff(INFINITY, (), ()),)))


def test_an_answer_that_miscounts_the_listed_ids_is_refused() -> None:
    mine = random_ids(3, random.Random(10))
    victim = Reconciler(ReconcileIndex.build(mine), initiator=True)
    victim.start()
    with pytest.raises(DecodeError):
        victim.receive(Message((IdDiff(INFINITY, (True,), ()),)))


def test_a_message_after_the_end_is_refused() -> None:
    ids = random_ids(100, random.Random(11))
    alice = Reconciler(ReconcileIndex.build(ids), initiator=True)
    bob = Reconciler(ReconcileIndex.build(ids), initiator=False)
    reply = bob.receive(alice.start())
    assert reply == Message(()) and bob.done
    assert alice.receive(reply) is None and alice.done
    with pytest.raises(DecodeError):
        alice.receive(Message(()))


def test_misuse_is_refused() -> None:
    index = ReconcileIndex.build([])
    with pytest.raises(InvalidInput):
        Reconciler(index, initiator=False).start()
    with pytest.raises(InvalidInput):
        Reconciler(index, initiator=True).receive(Message(()))
    initiator = Reconciler(index, initiator=True)
    initiator.start()
    with pytest.raises(InvalidInput):
        initiator.start()
    with pytest.raises(InvalidInput):
        Reconciler(index, initiator=True, max_message_bytes=1024)
    with pytest.raises(InvalidInput):
        Reconciler(index, initiator=True, branching=1)


def test_adding_ids_together_or_one_by_one_gives_the_same_index() -> None:
    rng = random.Random(21)
    first, second = random_ids(3000, rng), random_ids(3000, rng)
    one_by_one = ReconcileIndex.build(first)
    together = ReconcileIndex.build(first)
    for id in second:
        one_by_one.add(id)
    together.update([*second[:1000], *first[:10]])
    together.update(second[1000:], unheld=True)
    assert list(together) == list(one_by_one) == sorted({*first, *second})
    assert together.fingerprint(b"", INFINITY) == one_by_one.fingerprint(b"", INFINITY)
    with pytest.raises(InvalidInput):
        together.update([random_ids(1, rng)[0], b"not an id"])
    assert len(together) == 6000


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), version=st.booleans())
def test_garbage_is_refused_with_decode_errors_only(data: bytes, version: bool) -> None:
    if version:
        data = bytes([MESSAGE_VERSION]) + data
    try:
        message = decode_message(data)
    except DecodeError:
        return
    assert encode_message(message) == data  # whatever decodes is canonical
    victim = Reconciler(ReconcileIndex.build(random_ids(50, random.Random(12))), initiator=False)
    try:
        reply = victim.receive(message)
    except DecodeError:
        return
    assert reply is None or len(encode_message(reply)) <= DEFAULT_MAX_MESSAGE_BYTES


def _busy_message(rng: random.Random) -> Message:
    ids = sorted(random_ids(40, rng))
    return Message(
        (
            Fingerprint(separator(ids[3], ids[4]), rng.randbytes(16)),
            Skip(separator(ids[9], ids[10])),
            IdList(separator(ids[14], ids[15]), tuple(ids[10:14])),
            IdDiff(separator(ids[29], ids[30]), (True, False, True), tuple(ids[20:29])),
            IdList(INFINITY, tuple(ids[30:])),
        )
    )


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("rid")),
        min_size=1,
        max_size=4,
    ),
)
def test_damaged_messages_are_refused_or_handled(
    seed: int, edits: list[tuple[int, int, str]]
) -> None:
    data = bytearray(encode_message(_busy_message(random.Random(seed))))
    for position, value, kind in edits:
        at = position % (len(data) + 1)
        if kind == "r" and at < len(data):
            data[at] = value
        elif kind == "i":
            data.insert(at, value)
        elif at < len(data):
            del data[at]
    try:
        message = decode_message(bytes(data))
    except DecodeError:
        return
    assert encode_message(message) == bytes(data)
    # A side that listed a few ids and now reads the damaged reply.
    mine = random_ids(5, random.Random(seed))
    victim = Reconciler(ReconcileIndex.build(mine), initiator=True)
    victim.start()
    try:
        victim.receive(message)
    except DecodeError:
        return
    assert victim.have <= set(mine)
    assert not victim.need & set(mine)


def test_every_truncation_is_refused_or_a_shorter_canonical_message() -> None:
    data = encode_message(_busy_message(random.Random(13)))
    for cut in range(len(data)):
        try:
            message = decode_message(data[:cut])
        except DecodeError:
            continue
        assert encode_message(message) == data[:cut]


def _encoded_with(mutate: bytes, at: int, rng_seed: int = 14) -> bytes:
    data = bytearray(encode_message(_busy_message(random.Random(rng_seed))))
    data[at : at + len(mutate)] = mutate
    return bytes(data)


def test_malformed_messages_are_refused() -> None:
    rng = random.Random(15)
    ids = sorted(random_ids(4, rng))
    fp = bytes(16)
    bad: list[bytes] = [
        b"",  # no version
        bytes([MESSAGE_VERSION + 1]),  # another version
        # bounds out of order: the second bound is below the first
        encode_message(Message((Fingerprint(ids[2][:6], fp),)))
        + bytes([0x40 | 4, 2])
        + ids[1][4:6]
        + fp,
        # a bound equal to the previous one
        encode_message(Message((Fingerprint(ids[2][:6], fp),)))
        + bytes([0x40 | 5, 1])
        + ids[2][5:6]
        + fp,
        # a non-canonical bound: claims fewer shared bytes than it shares
        encode_message(Message((Fingerprint(ids[2][:6], fp),)))
        + bytes([0x40 | 0, 7])
        + ids[2][:6]
        + b"\x01"
        + fp,
        # a bound longer than an id
        bytes([MESSAGE_VERSION, 0x40 | 0, 37]) + bytes(37) + fp,
        # a bound sharing more bytes than the previous one has
        bytes([MESSAGE_VERSION, 0x40 | 3, 1, 5]) + fp,
        # a range after the one that ends at INFINITY
        bytes([MESSAGE_VERSION, 0x40 | 63]) + fp + bytes([0x40 | 0, 1, 5]) + fp,
        # a truncated fingerprint
        bytes([MESSAGE_VERSION, 0x40 | 63]) + fp[:15],
        # a trailing skip, and two consecutive skips
        bytes([MESSAGE_VERSION, 0x00 | 0, 1, 5]),
        bytes([MESSAGE_VERSION, 0, 1, 5, 0, 1, 6, 0x40 | 63]) + fp,
        # an id list that claims more ids than it holds
        bytes([MESSAGE_VERSION, 0x80 | 63, 2]) + ids[0],
        # an id of the wrong kind (not a CIDv1 sha2-256)
        bytes([MESSAGE_VERSION, 0x80 | 63, 1]) + b"\x00" * ID_LENGTH,
        # ids out of order
        bytes([MESSAGE_VERSION, 0x80 | 63, 2]) + ids[1] + ids[0],
        # duplicate ids
        bytes([MESSAGE_VERSION, 0x80 | 63, 2]) + ids[0] + ids[0],
        # an id outside its range (below the bound that ends it)
        bytes([MESSAGE_VERSION, 0x80 | 0, 6]) + ids[1][:6] + bytes([1]) + ids[2],
        # a non-minimal varint
        bytes([MESSAGE_VERSION, 0x80 | 63, 0x81, 0x00]) + ids[0],
        # a bitmap with a bit set past the listed count
        bytes([MESSAGE_VERSION, 0xC0 | 63, 3, 0b1000, 0]),
        # a varint longer than four bytes
        bytes([MESSAGE_VERSION, 0xC0 | 63, 0x80, 0x80, 0x80, 0x80, 0x01]),
    ]
    for data in bad:
        with pytest.raises(DecodeError):
            decode_message(data)


def test_oversized_messages_are_refused() -> None:
    with pytest.raises(TooLarge):
        decode_message(bytes([MESSAGE_VERSION]) + bytes(DEFAULT_MAX_MESSAGE_BYTES))
    ids = sorted(random_ids(MAX_ID_LIST + 1, random.Random(16)))
    with pytest.raises(TooLarge):
        decode_message(bytes([MESSAGE_VERSION, 0x80 | 63, 0x81, 0x02]) + b"".join(ids))
    with pytest.raises(TooLarge):
        IdList(INFINITY, tuple(ids))
    # More ranges than allowed: alternate empty id lists and skips (4 and 3 or 4 bytes each).
    body = bytearray([MESSAGE_VERSION])
    previous = b""
    for k in range(MAX_RANGES + 1):
        bound = (k + 1).to_bytes(3, "big")
        shared = 0
        while shared < len(previous) and bound[shared] == previous[shared]:
            shared += 1
        is_list = k % 2 == 1 or k == MAX_RANGES  # never end with a skip
        if k == MAX_RANGES:
            allowed = bytes(body)
        body += bytes([(2 if is_list else 0) << 6 | shared, 3 - shared]) + bound[shared:]
        if is_list:
            body.append(0)
        previous = bound
    with pytest.raises(TooLarge):
        decode_message(bytes(body), max_bytes=len(body))
    # The same message one range shorter decodes.
    assert len(decode_message(allowed, max_bytes=len(body)).ranges) == MAX_RANGES


def test_message_values_check_themselves() -> None:
    ids = sorted(random_ids(3, random.Random(17)))
    with pytest.raises(DecodeError):
        Message((Fingerprint(ids[1], bytes(16)), Fingerprint(ids[0], bytes(16))))
    with pytest.raises(DecodeError):
        Fingerprint(INFINITY, bytes(15))
    with pytest.raises(DecodeError):
        Skip(b"")
    with pytest.raises(DecodeError):
        IdList(INFINITY, (ids[0][:35],))
    with pytest.raises(DecodeError):
        Message((IdList(ids[1], (ids[2],)),))
    with pytest.raises(DecodeError):
        IdDiff(INFINITY, (1,), ())  # type: ignore[arg-type]


# --- the wire format -----------------------------------------------------------------------------


@st.composite
def messages(draw: st.DrawFn) -> Message:
    rng = random.Random(draw(st.integers(0, 2**32)))
    near = draw(st.booleans())
    count = draw(st.integers(0, 12))
    pool = sorted((near_ids if near else random_ids)(count * 6 + 2, rng))
    ranges: list[Skip | Fingerprint | IdList | IdDiff] = []
    position = 0
    previous_skip = True  # no skip first, to keep the draw simple
    for k in range(count):
        last = k == count - 1 and draw(st.booleans())
        stop = min(len(pool) - 1, position + draw(st.integers(1, 6)))
        upper = INFINITY if last else separator(pool[stop - 1], pool[stop])
        inside = tuple(pool[position:stop])
        kind = draw(st.sampled_from(["fp", "list", "diff"] + ([] if previous_skip else ["skip"])))
        if kind == "skip" and not last:
            ranges.append(Skip(upper))
        elif kind == "fp" or kind == "skip":
            ranges.append(Fingerprint(upper, rng.randbytes(16)))
        elif kind == "list":
            ranges.append(IdList(upper, inside))
        else:
            lacking = tuple(draw(st.lists(st.booleans(), max_size=20)))
            ranges.append(IdDiff(upper, lacking, inside))
        previous_skip = isinstance(ranges[-1], Skip)
        position = stop
        if last or stop >= len(pool) - 1:
            break
    if ranges and isinstance(ranges[-1], Skip):
        ranges.pop()
    return Message(tuple(ranges))


@given(messages())
def test_messages_round_trip(message: Message) -> None:
    data = encode_message(message)
    assert decode_message(data) == message
    assert encode_message(decode_message(data)) == data


def test_encoding_is_compact() -> None:
    ids = sorted(random_ids(2, random.Random(18)))
    bound = separator(ids[0], ids[1])
    data = encode_message(Message((Skip(bound), Fingerprint(INFINITY, bytes(16)))))
    # version, skip (header, length, bound), fingerprint (header, 16 bytes)
    assert len(data) == 1 + (2 + len(bound)) + (1 + 16)


# --- the index -----------------------------------------------------------------------------------


def test_separator_is_the_shortest_prefix_between() -> None:
    a = PREFIX + bytes(31) + b"\x05"
    b = PREFIX + bytes(31) + b"\x06"
    assert separator(a, b) == b
    c = PREFIX + b"\x01" + bytes(31)
    assert separator(a, c) == PREFIX + b"\x01"
    assert a < separator(a, c) <= c


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    initial=st.integers(0, 2000),
    added=st.integers(0, 2500),
    near=st.booleans(),
)
def test_index_fingerprints_match_a_direct_computation(
    seed: int, initial: int, added: int, near: bool
) -> None:
    rng = random.Random(seed)
    pool = (near_ids if near else random_ids)(initial + added, rng)
    rng.shuffle(pool)
    index = ReconcileIndex.build(pool[:initial] + pool[: initial // 3])  # with duplicates
    for value in pool[initial:]:
        index.add(value)
        index.add(value)  # adding twice is a no-op
    model = sorted(pool)
    assert len(index) == len(model)
    assert list(index) == model
    assert all(v in index for v in model[:: max(1, len(model) // 50)])
    assert PREFIX + bytes(32) not in index and b"nope" not in index
    bounds = sorted(
        {b""} | {v[: rng.randint(1, 36)] for v in rng.sample(model, min(8, len(model)))}
    )
    bounds.append(INFINITY)
    for low, high in itertools.pairwise(bounds):
        inside = [v for v in model if low <= v < high]
        assert index.fingerprint(low, high) == (len(inside), fingerprint(inside))
        assert index.count(low, high) == len(inside)
        assert index.slice(low, high, 5) == inside[:5]
        if len(inside) >= 4:
            cuts = index.split(low, high, 4)
            parts = [
                [v for v in inside if lo <= v < hi]
                for lo, hi in zip([low, *cuts], [*cuts, high], strict=True)
            ]
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            for cut, part in zip(cuts, parts[1:], strict=False):
                assert part[0][: len(cut)] == cut  # a bound is a prefix of the id above it


@pytest.mark.parametrize("initial", [0, 1, 15, 16, 17, 5000])
def test_index_stays_exact_across_merges_of_ids_added_high(initial: int) -> None:
    # Ids added only above the existing ones: the merge keeps the low sums and redoes the rest.
    rng = random.Random(initial)
    low = [PREFIX + bytes([rng.randrange(128)]) + rng.randbytes(31) for _ in range(initial)]
    high = [PREFIX + bytes([128 + rng.randrange(128)]) + rng.randbytes(31) for _ in range(3000)]
    index = ReconcileIndex.build(low)
    for value in high:
        index.add(value)
    model = sorted(set(low) | set(high))
    assert list(index) == model
    for cut in (PREFIX + b"\x40", PREFIX + b"\x80", PREFIX + b"\xc0"):
        below = [v for v in model if v < cut]
        assert index.fingerprint(b"", cut) == (len(below), fingerprint(below))
        above = [v for v in model if v >= cut]
        assert index.fingerprint(cut, INFINITY) == (len(above), fingerprint(above))


def test_fingerprint_depends_on_the_set_only() -> None:
    ids = random_ids(100, random.Random(19))
    assert fingerprint(ids) == fingerprint(reversed(ids))
    assert fingerprint(ids) != fingerprint(ids[1:])
    assert fingerprint([]) != fingerprint(ids[:1])
    assert len(fingerprint(ids)) == FINGERPRINT_LENGTH


def test_index_refuses_what_is_not_an_id() -> None:
    for bad in (b"short", PREFIX + bytes(31), bytes(36), "text", None):
        with pytest.raises(InvalidInput):
            ReconcileIndex.build([PREFIX + bytes(32), bad])  # type: ignore[list-item]
        with pytest.raises(InvalidInput):
            ReconcileIndex().add(bad)  # type: ignore[arg-type]


def test_a_failed_add_leaves_the_index_unchanged() -> None:
    ids = random_ids(10, random.Random(20))
    index = ReconcileIndex.build(ids)
    before = index.fingerprint(b"", INFINITY)
    with pytest.raises(InvalidInput):
        index.add(b"x" * 36)
    assert index.fingerprint(b"", INFINITY) == before and len(index) == 10
