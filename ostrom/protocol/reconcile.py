"""Range-based set reconciliation for `/ostrom/sync/1.0.0`: sans-IO, specified in docs/SYNC.md.

Two nodes each hold the record ids (36-byte binary CIDs) of one project and learn which ids
each side lacks, at a cost that grows with the difference, not with the sets. The design is
Aljoscha Meyer's range-based set reconciliation, close to Negentropy: ids are ordered by their
bytes; a message lists consecutive ranges of that order, each with a fingerprint, the sender's
ids, or an answer. A range whose fingerprints differ is split into `BRANCHING` sub-ranges,
until a side holds at most `LEAF_SIZE` ids in it and lists them; the other side answers with
the ids the lister lacks and a bitmap of the listed ids it lacks, so both sides end knowing
the whole difference.

`ReconcileIndex` is the local set, kept once per project and updated as records arrive.
`Reconciler` is one session with one peer: `start()` (initiator), then `receive()` each peer
message until it returns None; `have` and `need` then hold the difference. `encode_message`
and `decode_message` are the wire format. No I/O, no clock: the caller moves the bytes.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from heapq import merge
from itertools import accumulate, pairwise
from typing import Final

from ostrom.crypto.cid import CID_LENGTH, DAG_CBOR, RAW, SHA2_256, SHA2_256_LEN
from ostrom.errors import DecodeError, InvalidInput, TooLarge

# --- constants -----------------------------------------------------------------------------------

# Every id is a binary CIDv1 sha2-256 (dag-cbor for records, raw for blocks): always 36 bytes.
ID_LENGTH: Final = CID_LENGTH
_ID_PREFIXES: Final = frozenset(
    {bytes([1, DAG_CBOR, SHA2_256, SHA2_256_LEN]), bytes([1, RAW, SHA2_256, SHA2_256_LEN])}
)
# The upper bound of the last range: one byte longer than an id and all 0xff, so it compares
# above every id (and every id prefix) in Python's bytes order. On the wire it is one marker.
INFINITY: Final = b"\xff" * (ID_LENGTH + 1)
# 128 bits: a random collision between two different ranges is out of reach (2^-128 per
# comparison); Negentropy uses the same length.
FINGERPRINT_LENGTH: Final = 16
# The fingerprint sums ids modulo 2^256 (the 32 digest bytes of a CID; its 4 prefix bytes
# vanish modulo 2^256).
_SUM_MASK: Final = (1 << 256) - 1

# How many sub-ranges a differing range is split into. Each level of splitting costs about
# BRANCHING * 20 bytes per differing range and divides the range by BRANCHING. Measured by
# bench/reconcile.py (100,000 ids, 10 differences): 16 takes 10 KB in 7 messages; 8 saves a
# quarter of the bytes for one more message, 4 another sixth for three more; 32 costs 35% more
# bytes for one message less. docs/SYNC.md section 6 has the table.
BRANCHING: Final = 16
# A side that holds at most this many ids in a differing range lists them (36 bytes each)
# instead of splitting it once more (~320 bytes) and saves the two messages of a last level.
# A list of 16 costs at most about two splits; at 32 the lists dominate (+50% bytes at 100,000
# ids); below 16 bytes move by at most 11%, and only where they cost one more message.
LEAF_SIZE: Final = 16
# The most ids an IdList may carry on the wire. Senders list at most `LEAF_SIZE`; receivers
# accept up to 256 so that the leaf size can be retuned without a new protocol version, while
# an answer's bitmap stays at most 32 bytes.
MAX_ID_LIST: Final = 256
# The default bound of one message, both ways: 64 KiB is one Yamux window, and holds ~1,800 ids
# or ~3,000 fingerprints, which a Raspberry Pi processes in a few milliseconds.
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024
# The most ranges one message may hold. Every range costs its receiver a few bisections and a
# hash; 8,192 bounds that work per message whatever the byte bound. A 64 KiB message holds at
# most ~3,400 fingerprints (or ~6,000 alternating with skips); writers stop at this count too.
MAX_RANGES: Final = 8192
# The smallest bound a session accepts: it must hold the version byte, the largest reply to a
# single range (a split: up to 64 * 54 bytes, see `_MAX_SPLIT_ENTRY`) and the spill reserve.
MIN_MESSAGE_BYTES: Final = 4 * 1024
# The most ids one session may learn from a peer (`need`), about 36 MiB of ids: larger than
# any project we expect, so that a hostile peer inventing ids cannot grow memory without end.
DEFAULT_MAX_NEED: Final = 1 << 20
# Levels' worth of messages a session allows beyond 2 per level of splitting (see
# `max_rounds`): the first message, the listing, its answer and the closing reply take 4
# messages; the other 4 are margin (honest sessions stay under 20% of the bound in the tests).
ROUND_SLACK: Final = 4
# The typical size of a fingerprint entry (a 2- to 3-byte bound, the header, 16 bytes), for the
# round bound (see `max_rounds`).
_FINGERPRINT_ENTRY_BYTES: Final = 20

# Wire modes, in the top two bits of an entry's first byte.
MODE_SKIP: Final = 0
MODE_FINGERPRINT: Final = 1
MODE_ID_LIST: Final = 2
MODE_ID_DIFF: Final = 3
# The low six bits of an entry's first byte give how many bytes its bound shares with the
# previous bound (0..36); 63 marks the bound INFINITY.
_SHARED_INFINITY: Final = 63
# The first byte of every message; a new protocol version changes it.
MESSAGE_VERSION: Final = 1
# The largest varint this format carries: counts of ids in one message, far below 2^28.
_MAX_VARINT_BYTES: Final = 4
# Room kept free in every message for the fingerprint of a deferred rest (a header byte and
# 16 bytes) after a pending skip (a header, a length and up to 36 bytes of bound).
_SPILL_RESERVE: Final = 1 + FINGERPRINT_LENGTH + 2 + ID_LENGTH
# The most bytes one fingerprint entry takes: header, bound length, a full bound, fingerprint.
_MAX_SPLIT_ENTRY: Final = 2 + ID_LENGTH + FINGERPRINT_LENGTH
# Ids per prefix-sum checkpoint in the index: one 256-bit sum per 16 ids keeps the sums at
# ~5 bytes per id instead of ~70, for at most 15 extra additions per fingerprint.
_STRIDE: Final = 16
# The index merges its buffer of added ids into the sorted main list once the buffer holds
# more than max(_MIN_BUFFER, len // _BUFFER_FRACTION) ids: adding an id then costs a bisection,
# an insertion into the buffer and an amortized share of a merge (~2 us at 100,000 ids), and a
# session pays at most a re-sum of the buffer (n / 32 ids) instead of an O(n) merge.
_MIN_BUFFER: Final = 1024
_BUFFER_FRACTION: Final = 32


# --- ids and fingerprints ------------------------------------------------------------------------


def _check_id(value: object, error: type[InvalidInput] | type[DecodeError]) -> bytes:
    if not isinstance(value, bytes) or len(value) != ID_LENGTH or value[:4] not in _ID_PREFIXES:
        raise error(f"not a 36-byte binary CIDv1 sha2-256: {value!r:.80}")
    return value


def fingerprint_of(total: int, count: int) -> bytes:
    """The fingerprint of a range whose ids sum to `total` (any integer) and number `count`.

    sha256(sum mod 2^256 as 32 bytes big-endian || count as 8 bytes big-endian), first 16 bytes.
    Hashing the sum makes fingerprints of different ranges look unrelated; the count makes a
    range and the same range with ids that sum to zero differ.
    """
    data = (total & _SUM_MASK).to_bytes(32, "big") + count.to_bytes(8, "big")
    return hashlib.sha256(data).digest()[:FINGERPRINT_LENGTH]


def fingerprint(ids: Iterable[bytes]) -> bytes:
    """The fingerprint of a set of ids, computed directly (for tests and second implementers)."""
    values = [int.from_bytes(i, "big") for i in ids]
    return fingerprint_of(sum(values), len(values))


def separator(below: bytes, above: bytes) -> bytes:
    """The shortest prefix of `above` that is greater than `below` (which must be < `above`)."""
    shared = _shared_prefix(below, above)
    return above[: shared + 1]


def _shared_prefix(a: bytes, b: bytes) -> int:
    """How many leading bytes `a` and `b` share."""
    if len(a) == len(b) == ID_LENGTH:
        # Two ids: the first differing bit is the top bit of the XOR of the two integers.
        diff = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
        return ID_LENGTH - (diff.bit_length() + 7) // 8
    # Bounds are short (a few bytes past the CID prefix): a plain loop is fastest.
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# --- the local set -------------------------------------------------------------------------------


def _checkpoints(ids: list[bytes], start: int, first: int) -> list[int]:
    """Prefix sums of `ids` at every `_STRIDE`-th position from checkpoint `start` on."""
    blocks = (
        sum(map(int.from_bytes, ids[k : k + _STRIDE]))
        for k in range(start * _STRIDE, len(ids) - _STRIDE + 1, _STRIDE)
    )
    return list(accumulate(blocks, initial=first))


class ReconcileIndex:
    """The local set of ids, ordered, with fingerprints of any range in O(log n).

    A sorted main list with a prefix sum every `_STRIDE` ids, and a small sorted buffer of ids
    added since the last merge, with its own prefix sums. The sum of any range is four
    bisections and at most `_STRIDE` additions away; the buffer is merged into the main list
    (one timsort of two runs and a re-sum from the first changed position) when it outgrows
    max(1024, n/32), so no session pays an O(n) rebuild for the ids added since the last one.
    """

    __slots__ = ("_buffer", "_buffer_sums", "_ids", "_sums")

    def __init__(self) -> None:
        self._ids: list[bytes] = []
        self._sums: list[int] = [0]
        self._buffer: list[bytes] = []
        self._buffer_sums: list[int] | None = [0]

    @classmethod
    def build(cls, ids: Iterable[bytes]) -> ReconcileIndex:
        """An index over `ids` (duplicates are kept once); InvalidInput if one is not an id."""
        index = cls()
        values = list(ids)
        # Checked a column at a time (C loops), then one by one only to name a bad id.
        if (
            not all(type(v) is bytes for v in values)
            or {len(v) for v in values} - {ID_LENGTH}
            or {v[:4] for v in values} - _ID_PREFIXES
        ):
            for value in values:
                _check_id(value, InvalidInput)
        index._ids = sorted(set(values))
        index._sums = _checkpoints(index._ids, 0, 0)
        return index

    def add(self, id: bytes) -> None:
        """Add one id (no-op if present); InvalidInput if it is not a 36-byte CID."""
        _check_id(id, InvalidInput)
        if id in self:
            return
        insort(self._buffer, id)
        self._buffer_sums = None
        if len(self._buffer) > max(_MIN_BUFFER, len(self._ids) // _BUFFER_FRACTION):
            self._merge()

    def update(self, ids: Iterable[bytes], *, unheld: bool = False) -> None:
        """Add several ids at once (those present are skipped): one sort of the buffer, not
        an insertion each. InvalidInput if one is not an id (and then none is added). With
        `unheld`, the caller has just checked that none is here, and that is trusted."""
        new = sorted(set(ids) if unheld else {id for id in ids if id not in self})
        if not new:
            return
        for id in new:
            _check_id(id, InvalidInput)
        # A new list (an iteration of the old one may be under way): two sorted runs, which
        # timsort merges in linear time, in C, where `heapq.merge` steps in Python.
        buffer = self._buffer + new
        buffer.sort()
        self._buffer = buffer
        self._buffer_sums = None
        if len(self._buffer) > max(_MIN_BUFFER, len(self._ids) // _BUFFER_FRACTION):
            self._merge()

    def _merge(self) -> None:
        ids, buffer = self._ids, self._buffer
        first = bisect_left(ids, buffer[0]) // _STRIDE
        ids.extend(buffer)
        ids.sort()  # two sorted runs: timsort merges them in linear time
        self._sums[first:] = _checkpoints(ids, first, self._sums[first])
        self._buffer = []
        self._buffer_sums = [0]

    def __len__(self) -> int:
        return len(self._ids) + len(self._buffer)

    def __contains__(self, id: object) -> bool:
        if not isinstance(id, bytes):
            return False
        for ids in (self._ids, self._buffer):
            i = bisect_left(ids, id)
            if i < len(ids) and ids[i] == id:
                return True
        return False

    def __iter__(self) -> Iterator[bytes]:
        """The ids in ascending order."""
        return merge(self._ids, self._buffer)

    def _sum_below(self, bound: bytes) -> tuple[int, int]:
        """(count, sum) of the ids below `bound`."""
        ids = self._ids
        i = bisect_left(ids, bound)
        block = i // _STRIDE
        total = self._sums[block] + sum(map(int.from_bytes, ids[block * _STRIDE : i]))
        buffer = self._buffer
        if not buffer:
            return i, total
        sums = self._buffer_sums
        if sums is None:
            sums = self._buffer_sums = list(accumulate(map(int.from_bytes, buffer), initial=0))
        j = bisect_left(buffer, bound)
        return i + j, total + sums[j]

    def fingerprint(self, lower: bytes, upper: bytes) -> tuple[int, bytes]:
        """(count, fingerprint) of the ids in [lower, upper)."""
        count_low, sum_low = self._sum_below(lower)
        count_high, sum_high = self._sum_below(upper)
        count = count_high - count_low
        return count, fingerprint_of(sum_high - sum_low, count)

    def fingerprints(self, bounds: list[bytes]) -> list[bytes]:
        """The fingerprints of the consecutive ranges between ascending `bounds`."""
        sums = [self._sum_below(b) for b in bounds]
        return [fingerprint_of(high[1] - low[1], high[0] - low[0]) for low, high in pairwise(sums)]

    def count(self, lower: bytes, upper: bytes) -> int:
        """The number of ids in [lower, upper)."""
        return self._rank(upper) - self._rank(lower)

    def slice(self, lower: bytes, upper: bytes, limit: int) -> list[bytes]:
        """The first `limit` ids in [lower, upper), ascending."""
        parts = []
        for ids in (self._ids, self._buffer):
            start = bisect_left(ids, lower)
            stop = min(bisect_left(ids, upper), start + limit)
            parts.append(ids[start:stop])
        main, extra = parts
        if not extra:
            return main
        return sorted(main + extra)[:limit]

    def split(self, lower: bytes, upper: bytes, parts: int) -> list[bytes]:
        """The `parts - 1` bounds that cut the ids in [lower, upper) into `parts` runs of
        near-equal length (the range must hold at least `parts` ids). Each bound is the
        shortest prefix of a run's first id that is above the previous run's last id."""
        first = self._rank(lower)
        count = self._rank(upper) - first
        bounds = []
        for k in range(1, parts):
            r = first + k * count // parts
            bounds.append(separator(self._item(r - 1), self._item(r)))
        return bounds

    def _rank(self, bound: bytes) -> int:
        return bisect_left(self._ids, bound) + bisect_left(self._buffer, bound)

    def _item(self, rank: int) -> bytes:
        """The id at position `rank` of the ascending order (main and buffer together)."""
        a, b = self._ids, self._buffer
        if not b:
            return a[rank]
        # Take i ids from `a` and rank + 1 - i from `b`: find the smallest i whose next `a`
        # id is above the last `b` id taken; the answer is the larger of the two last taken.
        lo, hi = max(0, rank + 1 - len(b)), min(rank + 1, len(a))
        while lo < hi:
            i = (lo + hi) // 2
            if a[i] < b[rank - i]:
                lo = i + 1
            else:
                hi = i
        j = rank + 1 - lo
        if lo == 0:
            return b[j - 1]
        if j == 0:
            return a[lo - 1]
        return max(a[lo - 1], b[j - 1])


# --- messages ------------------------------------------------------------------------------------


def _check_bound(upper: object) -> None:
    if type(upper) is not bytes or not (1 <= len(upper) <= ID_LENGTH or upper == INFINITY):
        raise DecodeError(f"a range bound is 1..{ID_LENGTH} bytes or INFINITY: {upper!r:.80}")


def _check_ids(ids: object, limit: int) -> None:
    if type(ids) is not tuple:
        raise DecodeError("ids are a tuple of bytes")
    if len(ids) > limit:
        raise TooLarge(f"{len(ids)} ids in one range, more than {limit}")
    for value in ids:
        _check_id(value, DecodeError)
    if any(a >= b for a, b in pairwise(ids)):
        raise DecodeError("ids in a range are not strictly ascending")


@dataclass(frozen=True, slots=True)
class Skip:
    """Nothing to say about the range: it agrees, or it is settled."""

    upper: bytes

    def __post_init__(self) -> None:
        _check_bound(self.upper)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The sender's fingerprint of the range; the receiver answers if its own differs."""

    upper: bytes
    fingerprint: bytes

    def __post_init__(self) -> None:
        _check_bound(self.upper)
        if type(self.fingerprint) is not bytes or len(self.fingerprint) != FINGERPRINT_LENGTH:
            raise DecodeError(f"a fingerprint is {FINGERPRINT_LENGTH} bytes")


@dataclass(frozen=True, slots=True)
class IdList:
    """All of the sender's ids in the range; the receiver answers with an `IdDiff`."""

    upper: bytes
    ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_bound(self.upper)
        _check_ids(self.ids, MAX_ID_LIST)


@dataclass(frozen=True, slots=True)
class IdDiff:
    """The answer to an `IdList` over (a leading part of) its range.

    `lacking[i]` says whether the sender lacks the i-th id the receiver listed in this range;
    `ids` are the sender's ids in the range that the receiver did not list.
    """

    upper: bytes
    lacking: tuple[bool, ...]
    ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_bound(self.upper)
        if type(self.lacking) is not tuple or not all(type(b) is bool for b in self.lacking):
            raise DecodeError("lacking is a tuple of booleans")
        if len(self.lacking) > MAX_ID_LIST:
            raise TooLarge(f"an answer to {len(self.lacking)} listed ids, over {MAX_ID_LIST}")
        _check_ids(self.ids, DEFAULT_MAX_NEED)


Range = Skip | Fingerprint | IdList | IdDiff


@dataclass(frozen=True, slots=True)
class Message:
    """Consecutive ranges: the first starts at the lowest id, each ends at its `upper` bound
    (exclusive) where the next starts. Ids past the last range are skipped.

    Bounds strictly ascend, INFINITY only last; ids lie within their range; no skip follows a
    skip and none ends the message (so every message has exactly one encoding).
    """

    ranges: tuple[Range, ...]

    def __post_init__(self) -> None:
        if type(self.ranges) is not tuple:
            raise DecodeError("a message's ranges are a tuple")
        if len(self.ranges) > MAX_RANGES:
            raise TooLarge(f"{len(self.ranges)} ranges in one message, over {MAX_RANGES}")
        lower = b""
        previous_skip = False
        for entry in self.ranges:
            if not isinstance(entry, Skip | Fingerprint | IdList | IdDiff):
                raise DecodeError(f"not a range: {entry!r:.80}")
            if lower == INFINITY:
                raise DecodeError("a range follows the one that ends at INFINITY")
            upper = entry.upper
            if upper <= lower:
                raise DecodeError("range bounds are not strictly ascending")
            skip = isinstance(entry, Skip)
            if skip and previous_skip:
                raise DecodeError("two consecutive skips")
            ids = entry.ids if isinstance(entry, IdList | IdDiff) else ()
            if ids and (ids[0] < lower or ids[-1] >= upper):
                raise DecodeError("an id lies outside its range")
            previous_skip = skip
            lower = upper
        if previous_skip:
            raise DecodeError("a message ends with a skip")

    @property
    def asks(self) -> bool:
        """Whether the message expects a reply: it holds a fingerprint or an id list."""
        return any(isinstance(r, Fingerprint | IdList) for r in self.ranges)


# --- wire format ---------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _bound_size(previous: bytes, upper: bytes) -> int:
    """Bytes a bound takes after the header byte."""
    if upper == INFINITY:
        return 0
    return 1 + len(upper) - _shared_prefix(previous, upper)


def _payload_size(entry: Range) -> int:
    if isinstance(entry, Skip):
        return 0
    if isinstance(entry, Fingerprint):
        return FINGERPRINT_LENGTH
    if isinstance(entry, IdList):
        return _varint_size(len(entry.ids)) + ID_LENGTH * len(entry.ids)
    listed = len(entry.lacking)
    return (
        _varint_size(listed)
        + (listed + 7) // 8
        + _varint_size(len(entry.ids))
        + ID_LENGTH * len(entry.ids)
    )


def _entry_size(previous: bytes, entry: Range) -> int:
    return 1 + _bound_size(previous, entry.upper) + _payload_size(entry)


def _mode(entry: Range) -> int:
    if isinstance(entry, Skip):
        return MODE_SKIP
    if isinstance(entry, Fingerprint):
        return MODE_FINGERPRINT
    if isinstance(entry, IdList):
        return MODE_ID_LIST
    return MODE_ID_DIFF


def encode_message(message: Message) -> bytes:
    """The wire form of a message (docs/SYNC.md): a version byte, then each range."""
    out = bytearray([MESSAGE_VERSION])
    previous = b""
    for entry in message.ranges:
        upper = entry.upper
        mode = _mode(entry) << 6
        if upper == INFINITY:
            out.append(mode | _SHARED_INFINITY)
        else:
            shared = _shared_prefix(previous, upper)
            out.append(mode | shared)
            out.append(len(upper) - shared)
            out += upper[shared:]
        previous = upper
        if isinstance(entry, Fingerprint):
            out += entry.fingerprint
        elif isinstance(entry, IdList):
            out += _varint(len(entry.ids))
            out += b"".join(entry.ids)
        elif isinstance(entry, IdDiff):
            listed = len(entry.lacking)
            bits = sum(1 << i for i, lacks in enumerate(entry.lacking) if lacks)
            out += _varint(listed)
            out += bits.to_bytes((listed + 7) // 8, "little")
            out += _varint(len(entry.ids))
            out += b"".join(entry.ids)
    return bytes(out)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise DecodeError(f"message truncated: {n} bytes wanted at offset {self.pos}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            b = self.byte()
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if b == 0 and i > 0:
                    raise DecodeError("a varint is not minimal")
                return value
        raise DecodeError(f"a varint is longer than {_MAX_VARINT_BYTES} bytes")

    def ids(self, limit: int) -> tuple[bytes, ...]:
        count = self.varint()
        if count > limit:
            raise TooLarge(f"{count} ids in one range, more than {limit}")
        blob = self.take(count * ID_LENGTH)
        return tuple(blob[k : k + ID_LENGTH] for k in range(0, len(blob), ID_LENGTH))


def decode_message(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse and check a message; DecodeError on anything malformed, TooLarge if oversized."""
    if type(data) is not bytes:
        raise DecodeError("a sync message is bytes")
    if len(data) > max_bytes:
        raise TooLarge(f"sync message of {len(data)} bytes, over {max_bytes}")
    reader = _Reader(data)
    if not data or reader.byte() != MESSAGE_VERSION:
        raise DecodeError(f"not a sync message of version {MESSAGE_VERSION}")
    ranges: list[Range] = []
    previous = b""
    while reader.pos < len(data):
        if len(ranges) == MAX_RANGES:
            raise TooLarge(f"more than {MAX_RANGES} ranges in one message")
        header = reader.byte()
        mode, shared = header >> 6, header & 0x3F
        if shared == _SHARED_INFINITY:
            upper = INFINITY
        else:
            if shared > len(previous):
                raise DecodeError("a bound shares more bytes than the previous bound has")
            length = reader.byte()
            if not 1 <= length <= ID_LENGTH - shared:
                raise DecodeError(f"a bound's suffix of {length} bytes after {shared} shared")
            suffix = reader.take(length)
            # Canonical and ascending at once: the first new byte must be above the previous
            # bound's byte at that position (or the previous bound ends there).
            if shared < len(previous) and suffix[0] <= previous[shared]:
                raise DecodeError("range bounds are not strictly ascending or not canonical")
            upper = previous[:shared] + suffix
        entry: Range
        if mode == MODE_SKIP:
            entry = Skip(upper)
        elif mode == MODE_FINGERPRINT:
            entry = Fingerprint(upper, reader.take(FINGERPRINT_LENGTH))
        elif mode == MODE_ID_LIST:
            entry = IdList(upper, reader.ids(MAX_ID_LIST))
        else:
            listed = reader.varint()
            if listed > MAX_ID_LIST:
                raise TooLarge(f"an answer to {listed} listed ids, over {MAX_ID_LIST}")
            bits = int.from_bytes(reader.take((listed + 7) // 8), "little")
            if bits >> listed:
                raise DecodeError("an answer's bitmap has bits set past its length")
            lacking = tuple(bool(bits >> i & 1) for i in range(listed))
            entry = IdDiff(upper, lacking, reader.ids(len(data) // ID_LENGTH))
        ranges.append(entry)
        previous = upper
    return Message(tuple(ranges))


# --- the session ---------------------------------------------------------------------------------


def levels(count: int, branching: int = BRANCHING, leaf_size: int = LEAF_SIZE) -> int:
    """How many splits bring a range of `count` ids down to at most `leaf_size` ids."""
    n = 0
    while count > leaf_size:
        count = -(-count // branching)
        n += 1
    return n


def max_rounds(
    size: int,
    learned: int,
    *,
    branching: int = BRANCHING,
    leaf_size: int = LEAF_SIZE,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> int:
    """The most messages a side accepts in one session (docs/SYNC.md, "Bounds").

    `size` is the local set plus the ids learned from the peer so far, `learned` the ids of
    the difference known so far (have + need). An exchange whose messages never fill up takes
    one cycle: 2 messages per level of splitting, plus the first message, the listing, its
    answer and the closing reply (`ROUND_SLACK` levels' worth keeps room for those). When
    messages fill up, each spill starts a new cycle over the deferred rest, and each cycle
    teaches both sides at least one id per listing or split that fits in a message; so every
    `max_message_bytes / (leaf listing + split)` ids learned allow one more cycle. A peer can
    only raise `learned` by sending ids, and `need` is capped, so a session always ends.
    """
    depth = levels(max(size, 1), branching, leaf_size)
    per_id = leaf_size * ID_LENGTH + branching * _FINGERPRINT_ENTRY_BYTES
    cycles = 1 + -(-learned * per_id // max_message_bytes)
    return 2 * (depth + ROUND_SLACK) * cycles


class _Writer:
    """Builds the reply: consecutive ranges within a byte budget, skips merged, trailing skip
    dropped, and a fingerprint of the deferred rest when the budget runs out (a spill)."""

    __slots__ = ("budget", "entries", "previous", "size", "skip", "spilled")

    def __init__(self, max_message_bytes: int) -> None:
        self.budget = max_message_bytes - 1 - _SPILL_RESERVE
        self.entries: list[Range] = []
        self.previous = b""  # the upper bound of the last entry written
        self.size = 0
        self.skip: bytes | None = None  # the upper bound of a pending skip
        self.spilled = False

    def room(self) -> int:
        """Bytes left for the next entries, after the pending skip."""
        skip = 0 if self.skip is None else 1 + _bound_size(self.previous, self.skip)
        return self.budget - self.size - skip

    def add_skip(self, upper: bytes) -> None:
        self.skip = upper

    def add(self, entries: list[Range], *, reserve: bool = False) -> bool:
        """Append `entries` after the pending skip if they fit; `reserve` lets them use the
        room kept for a spill. Return whether they were added."""
        previous = self.previous
        total = 0
        if self.skip is not None:
            total = 1 + _bound_size(previous, self.skip)
            previous = self.skip
        for entry in entries:
            total += _entry_size(previous, entry)
            previous = entry.upper
        if self.size + total > self.budget + (_SPILL_RESERVE if reserve else 0):
            return False
        count = len(self.entries) + len(entries) + (self.skip is not None)
        if count > MAX_RANGES - (0 if reserve else 2):  # room for a skip and the spill
            return False
        if self.skip is not None:
            self.entries.append(Skip(self.skip))
            self.skip = None
        self.entries.extend(entries)
        self.size += total
        self.previous = previous
        return True

    def message(self) -> Message:
        return Message(tuple(self.entries))


class Reconciler:
    """One reconciliation session with one peer, over one index (see the module docstring).

    The index may grow during the session: ranges already settled stay settled, later ones
    see the new ids. After an error the session is over; `have` and `need` keep what was
    learned, each id of them true at the moment it was learned.
    """

    __slots__ = (
        "_branching",
        "_done",
        "_index",
        "_leaf_size",
        "_max_message_bytes",
        "_max_need",
        "_pending",
        "_rounds",
        "_started",
        "have",
        "initiator",
        "need",
    )

    def __init__(
        self,
        index: ReconcileIndex,
        *,
        initiator: bool,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        branching: int = BRANCHING,
        leaf_size: int = LEAF_SIZE,
        max_need: int = DEFAULT_MAX_NEED,
    ) -> None:
        if not isinstance(index, ReconcileIndex):
            raise InvalidInput("a Reconciler needs a ReconcileIndex")
        if not 2 <= branching <= 64 or not 1 <= leaf_size <= MAX_ID_LIST:
            raise InvalidInput(f"branching 2..64 and leaf size 1..{MAX_ID_LIST}")
        # The largest reply to one range must fit in an otherwise empty message, so that every
        # message answers at least its first range and a session always moves forward.
        largest = max(
            branching * _MAX_SPLIT_ENTRY,
            _MAX_SPLIT_ENTRY + _MAX_VARINT_BYTES + leaf_size * ID_LENGTH,
        )
        smallest = max(MIN_MESSAGE_BYTES, 1 + _SPILL_RESERVE + largest)
        if max_message_bytes < smallest:
            raise InvalidInput(f"max_message_bytes must be at least {smallest} for these settings")
        if max_need < 1:
            raise InvalidInput("max_need must be positive")
        self._index = index
        self.initiator = initiator
        self._max_message_bytes = max_message_bytes
        self._branching = branching
        self._leaf_size = leaf_size
        self._max_need = max_need
        self.have: set[bytes] = set()
        self.need: set[bytes] = set()
        # The ranges this side listed in its last message, with the ids it listed.
        self._pending: list[tuple[bytes, bytes, tuple[bytes, ...]]] = []
        self._rounds = 0
        self._started = False
        self._done = False

    @property
    def done(self) -> bool:
        """True once this side has nothing more to send or to receive."""
        return self._done

    @property
    def rounds(self) -> int:
        """Messages received so far."""
        return self._rounds

    def round_limit(self) -> int:
        """The most messages this side will receive (see `max_rounds`)."""
        return max_rounds(
            len(self._index) + len(self.need),
            len(self.have) + len(self.need),
            branching=self._branching,
            leaf_size=self._leaf_size,
            max_message_bytes=self._max_message_bytes,
        )

    def start(self) -> Message:
        """The initiator's first message: the whole set's fingerprint, or its ids if few."""
        if not self.initiator or self._started:
            raise InvalidInput("only the initiator starts, once")
        self._started = True
        count, fp = self._index.fingerprint(b"", INFINITY)
        if count <= self._leaf_size:
            ids = tuple(self._index.slice(b"", INFINITY, count))
            self._pending = [(b"", INFINITY, ids)]
            return Message((IdList(INFINITY, ids),))
        return Message((Fingerprint(INFINITY, fp),))

    def receive(self, message: Message) -> Message | None:
        """Process the peer's message; return the reply, or None when the exchange is over.

        DecodeError if the message breaks the protocol, TooLarge past the round bound or the
        cap on `need`.
        """
        if self.initiator and not self._started:
            raise InvalidInput("the initiator must start() before it receives")
        if self._done:
            raise DecodeError("the peer sent a message after the exchange ended")
        if not isinstance(message, Message):
            raise InvalidInput("receive() takes a decoded Message")
        self._rounds += 1
        if self._rounds > self.round_limit():
            raise TooLarge(f"sync session over its bound of {self.round_limit()} messages")
        self._started = True
        pending, self._pending = self._pending, []
        out = _Writer(self._max_message_bytes)
        lower = b""
        for entry in message.ranges:
            upper = entry.upper
            if isinstance(entry, IdDiff):
                self._learn_answer(lower, entry, pending)
                if not out.spilled:
                    out.add_skip(upper)
            elif out.spilled:
                pass
            elif isinstance(entry, Skip):
                out.add_skip(upper)
            elif isinstance(entry, Fingerprint):
                self._answer_fingerprint(out, lower, entry)
            else:
                self._answer_list(out, lower, entry)
            lower = upper
        if len(self.need) > self._max_need:
            raise TooLarge(f"the peer offered more than {self._max_need} ids in one session")
        if not message.asks:
            self._done = True
            return None
        reply = out.message()
        self._pending = [
            (low, r.upper, r.ids)
            for low, r in zip((b"", *(r.upper for r in reply.ranges)), reply.ranges, strict=False)
            if isinstance(r, IdList)
        ]
        if not reply.asks:
            self._done = True
        return reply

    def _spill(self, out: _Writer, lower: bytes) -> None:
        """Defer [lower, INFINITY): one fingerprint over it, which the peer will split."""
        _, fp = self._index.fingerprint(lower, INFINITY)
        out.add([Fingerprint(INFINITY, fp)], reserve=True)
        out.spilled = True

    def _answer_fingerprint(self, out: _Writer, lower: bytes, entry: Fingerprint) -> None:
        upper = entry.upper
        count, fp = self._index.fingerprint(lower, upper)
        if fp == entry.fingerprint:
            out.add_skip(upper)
            return
        reply: list[Range]
        if count <= self._leaf_size:
            reply = [IdList(upper, tuple(self._index.slice(lower, upper, count)))]
        else:
            parts = min(self._branching, count)
            bounds = [lower, *self._index.split(lower, upper, parts), upper]
            fps = self._index.fingerprints(bounds)
            reply = [Fingerprint(high, fp) for high, fp in zip(bounds[1:], fps, strict=True)]
        if not out.add(reply):
            self._spill(out, lower)

    def _answer_list(self, out: _Writer, lower: bytes, entry: IdList) -> None:
        """Answer the peer's ids with ours: as much of the range as fits, the rest deferred."""
        upper, theirs = entry.upper, entry.ids
        theirs_set = set(theirs)
        # The entry's header, a bound of up to a whole id, two counts and the bitmap.
        fixed = 2 + ID_LENGTH + 2 * _MAX_VARINT_BYTES + (len(theirs) + 7) // 8
        fit = (out.room() - fixed) // ID_LENGTH
        if fit < 1:
            self._spill(out, lower)
            return
        # Our ids in the range, enough of them to find `fit` that the peer did not list and
        # the id after them, which bounds the part answered.
        chunk = self._index.slice(lower, upper, fit + len(theirs) + 1)
        extra: list[bytes] = []
        cut = len(chunk)
        for k, value in enumerate(chunk):
            if value not in theirs_set:
                if len(extra) == fit:
                    cut = k
                    break
                extra.append(value)
        high = separator(chunk[cut - 1], chunk[cut]) if cut < len(chunk) else upper
        listed = theirs[: bisect_left(theirs, high)]
        lacking = tuple(value not in self._index for value in listed)
        self.have.update(extra)
        self.need.update(v for v, lacks in zip(listed, lacking, strict=True) if lacks)
        if not extra and not any(lacking):
            out.add_skip(high)
        elif not out.add([IdDiff(high, lacking, tuple(extra))]):
            # Out of ranges rather than bytes (`fit` leaves the bytes): defer the whole range.
            self._spill(out, lower)
            return
        if high != upper:
            self._spill(out, high)

    def _learn_answer(
        self,
        lower: bytes,
        entry: IdDiff,
        pending: list[tuple[bytes, bytes, tuple[bytes, ...]]],
    ) -> None:
        """Take the peer's answer to a range this side listed in its last message."""
        k = bisect_left(pending, (lower, b"", ())) if pending else 0
        if k == len(pending) or pending[k][0] != lower or entry.upper > pending[k][1]:
            raise DecodeError("an answer to a range this side did not list")
        ours = pending[k][2]
        listed = ours[: bisect_left(ours, entry.upper)]
        if len(listed) != len(entry.lacking):
            raise DecodeError(
                f"an answer covers {len(entry.lacking)} listed ids, not the {len(listed)} listed"
            )
        self.have.update(v for v, lacks in zip(listed, entry.lacking, strict=True) if lacks)
        index = self._index
        self.need.update(v for v in entry.ids if v not in index)
