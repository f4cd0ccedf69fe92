"""The community meshes this node is in: their descriptions, members, and this node's part.

The registry keeps, for each joined mesh, its verified description and its members as the
stored membership records say (`ostrom.protocol.meshes.members`), recomputed whenever a new
membership record is stored. Listeners hear of every change of membership, so a revocation
takes effect at once: the mesh layer re-checks its connections.

It also keeps, in memory only, the mesh catalogues (`ostrom.protocol.catalogue`): this node's
own, one per joined mesh, signed again whenever what it follows changes, and the latest one
of each other member. Those are rebuilt from peers after a restart (every connection's mesh
exchange carries them), so nothing of them is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import Identity, peer_id_of
from ostrom.errors import (
    AlreadyExists,
    Ambiguous,
    InvalidInput,
    InvalidRecord,
    NotFound,
    OstromError,
    Refused,
)
from ostrom.node.events import EventBus
from ostrom.node.store import Store
from ostrom.protocol.catalogue import (
    CATALOGUE_MIN_INTERVAL_MS,
    CATALOGUE_REFRESH_MS,
    Catalogue,
    CatalogueBook,
    CatalogueEntry,
    Host,
    SignedCatalogue,
    announceable_addrs,
    fit_entries,
    sign_catalogue,
)
from ostrom.protocol.meshes import (
    Access,
    Membership,
    MembershipAction,
    MeshDescription,
    MeshMembers,
    SignedMeshRecord,
    check_membership,
    decode_invite,
    encode_invite,
    members,
    sign_mesh_record,
)
from ostrom.protocol.records import Project as ProjectBody

log = logging.getLogger(__name__)

Db = Callable[..., Awaitable[Any]]

# The most membership records one mesh may hold here: a community of thousands, each admitted
# and revoked a few times. Past it, new records for that mesh are refused.
MAX_MEMBERSHIP_RECORDS: Final = 20_000


@dataclass(frozen=True, slots=True)
class JoinedMesh:
    """A mesh this node is in: its description, its membership records, and who belongs
    to it as those records say (`of` works it out)."""

    description: SignedMeshRecord
    memberships: tuple[SignedMeshRecord, ...]
    members: MeshMembers

    @classmethod
    def of(
        cls, description: SignedMeshRecord, memberships: Sequence[SignedMeshRecord]
    ) -> JoinedMesh:
        return cls(description, tuple(memberships), members(description, memberships))

    @property
    def cid(self) -> CID:
        return self.description.cid

    @property
    def body(self) -> MeshDescription:
        body = self.description.body
        assert isinstance(body, MeshDescription)
        return body


class MeshRegistry:
    """The meshes this node is in, kept in memory and in the store."""

    def __init__(
        self,
        identity: Identity,
        db: Db,
        events: EventBus,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._identity = identity
        self._db = db
        self.events = events
        self._clock = clock
        self._joined: dict[CID, JoinedMesh] = {}
        # Called with a mesh's CID when its membership changes, or when it is joined or left.
        self.listeners: list[Callable[[CID], None]] = []
        # Called with the membership records this node signs, for the mesh layer to publish.
        self.record_listeners: list[Callable[[Sequence[SignedMeshRecord]], None]] = []
        # Other members' latest catalogues, and this node's own per joined mesh.
        self.catalogues = CatalogueBook()
        self._own: dict[CID, SignedCatalogue] = {}
        # Called with the catalogues this node signs (a withdrawal too), for publishing.
        self.catalogue_listeners: list[Callable[[Sequence[SignedCatalogue]], None]] = []
        # What each followed project's genesis says: its name, and the private mesh it names.
        self._genesis: dict[CID, tuple[str, CID | None]] = {}

    async def load(self) -> None:
        """Read the joined meshes and their membership records from the store."""

        def read(store: Store) -> list[list[SignedMeshRecord]]:
            return [store.mesh_records(mesh) for mesh in store.joined_meshes()]

        for records in await self._db(read):
            if records and isinstance(records[0].body, MeshDescription):
                self._joined[records[0].cid] = JoinedMesh.of(records[0], records[1:])

    def _changed(self, mesh: CID, kind: str, **fields: Any) -> None:
        self.events.publish({"type": kind, "mesh": str(mesh), **fields})
        for listener in list(self.listeners):
            try:
                listener(mesh)
            except OstromError as exc:
                log.warning("a mesh listener failed: %s", exc.message)

    # --- what the node asks -----------------------------------------------------------------

    def joined(self) -> list[JoinedMesh]:
        return list(self._joined.values())

    def get(self, mesh: CID) -> JoinedMesh | None:
        return self._joined.get(mesh)

    def resolve(self, text: str) -> JoinedMesh:
        """A joined mesh by full CID, unique CID prefix, or unique name."""
        text = text.strip()
        found = [m for m in self._joined.values() if m.body.name == text]
        if not found:
            found = [m for m in self._joined.values() if str(m.cid).startswith(text)]
        if not found:
            raise NotFound(f"this node is in no mesh named {text!r} (see `ostrom mesh list`)")
        if len(found) > 1:
            names = ", ".join(f"{m.body.name} ({m.cid})" for m in found[:5])
            raise Ambiguous(f"{text!r} names several meshes: {names}")
        return found[0]

    def admits(self, public_key: bytes | None) -> bool:
        """Whether a peer (by key; None if it has no ed25519 key) may stay connected: a node
        in no mesh, or in an open one, takes anyone; a node only in private meshes takes
        their members."""
        if not self._joined or any(m.members.access == "open" for m in self._joined.values()):
            return True
        return public_key is not None and any(
            m.members.admits(public_key) for m in self._joined.values()
        )

    def accepts(self, record: SignedMeshRecord) -> bool:
        """Whether `record` is a membership record of a joined mesh that a steward signed."""
        joined = self._joined.get(record.mesh)
        if joined is None:
            return False
        try:
            check_membership(joined.description, record)
        except InvalidRecord:
            return False
        return True

    # --- what the owner does -----------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock() * 1000)

    async def create(
        self,
        name: str,
        access: Access,
        *,
        description: str = "",
        bootstrap: Sequence[str] = (),
        stewards: Sequence[bytes] = (),
    ) -> JoinedMesh:
        """Sign a new mesh description with this node's key, as its first steward, and join.
        Values a mesh description cannot hold raise `InvalidRecord`."""
        if any(m.body.name == name for m in self._joined.values()):
            raise AlreadyExists(f"this node is already in a mesh named {name!r}")
        keys = tuple(sorted({self._identity.public_key, *stewards}))
        body = MeshDescription(
            author=self._identity.public_key,
            ts=self._now(),
            name=name,
            access=access,
            stewards=keys,
            bootstrap=tuple(dict.fromkeys(bootstrap)),
            description=description,
        )
        record = sign_mesh_record(body, self._identity)
        return await self._join(record)

    def invite(self, mesh: CID) -> str:
        joined = self._joined.get(mesh)
        if joined is None:
            raise NotFound(f"this node is not in mesh {mesh}")
        return encode_invite(joined.description)

    async def join(self, invite: str) -> JoinedMesh:
        """Join the mesh an invite describes (the invite is verified first)."""
        try:
            description = decode_invite(invite)
        except (InvalidRecord, InvalidInput) as exc:
            raise InvalidInput(f"not a valid invite: {exc.message}") from None
        return await self._join(description)

    async def _join(self, description: SignedMeshRecord) -> JoinedMesh:
        now = self._now()

        def write(store: Store) -> list[SignedMeshRecord]:
            store.put_mesh_records([description])
            store.join_mesh(description.cid, now)
            return store.mesh_records(description.cid)[1:]

        memberships = await self._db(write)
        already = description.cid in self._joined
        joined = self._joined[description.cid] = JoinedMesh.of(description, memberships)
        if not already:
            self._changed(joined.cid, "mesh.joined", name=joined.body.name)
        return joined

    async def leave(self, mesh: CID) -> bool:
        left = await self._db(lambda store: store.leave_mesh(mesh))
        own = self._own.pop(mesh, None)
        if own is not None and mesh in self._joined:
            # An empty catalogue replaces this node's last one: members stop listing it as a
            # host at once, rather than when the old one ages out.
            ts = max(self._now(), own.body.ts + CATALOGUE_MIN_INTERVAL_MS)
            withdrawal = sign_catalogue(
                Catalogue(self._identity.public_key, ts, mesh), self._identity
            )
            for listener in list(self.catalogue_listeners):
                listener([withdrawal])
        self.catalogues.drop_mesh(mesh)
        gone = self._joined.pop(mesh, None)
        if gone is not None:
            self._changed(mesh, "mesh.left", name=gone.body.name)
        return bool(left)

    async def set_membership(
        self, mesh: CID, member: bytes, action: MembershipAction, note: str = ""
    ) -> SignedMeshRecord:
        """Sign and store an admission or revocation; this node must be a steward. A record
        the mesh cannot take (a steward revoked, an open mesh) raises `InvalidRecord`."""
        joined = self._joined.get(mesh)
        if joined is None:
            raise NotFound(f"this node is not in mesh {mesh}")
        if self._identity.public_key not in joined.body.stewards:
            raise Refused(f"only a steward of {joined.body.name!r} admits or revokes members")
        body = Membership(self._identity.public_key, self._now(), mesh, action, member, note)
        record = sign_mesh_record(body, self._identity)
        check_membership(joined.description, record)
        # Published first, stored next: listeners of the membership change then act after
        # the record is on its way to the members.
        for listener in list(self.record_listeners):
            listener([record])
        await self.ingest([record])
        return record

    # --- what peers send --------------------------------------------------------------------

    async def ingest(self, records: Sequence[SignedMeshRecord]) -> list[SignedMeshRecord]:
        """Store the membership records of joined meshes that a steward could have signed;
        return the new ones. Others are ignored (a peer may be in meshes we are not)."""
        by_mesh: dict[CID, list[SignedMeshRecord]] = {}
        for record in records:
            joined = self._joined.get(record.mesh)
            if joined is None or not isinstance(record.body, Membership):
                continue
            try:
                check_membership(joined.description, record)
            except InvalidRecord as exc:
                log.info("ignoring a membership record of %s: %s", record.mesh, exc.message)
                continue
            by_mesh.setdefault(record.mesh, []).append(record)
        new: list[SignedMeshRecord] = []
        for mesh, batch in by_mesh.items():
            joined = self._joined[mesh]
            known = {r.cid for r in joined.memberships}
            fresh = list({r.cid: r for r in batch if r.cid not in known}.values())
            if not fresh:
                continue
            if len(known) + len(fresh) > MAX_MEMBERSHIP_RECORDS:
                log.warning("mesh %s holds too many membership records; ignoring more", mesh)
                continue
            await self._db(lambda store, b=fresh: store.put_mesh_records(b))
            after = JoinedMesh.of(joined.description, (*joined.memberships, *fresh))
            self._joined[mesh] = after
            new += fresh
            was, now = joined.members.admitted, after.members.admitted
            if was != now:
                # A revoked member's catalogue goes with its membership.
                self.catalogues.keep_only(mesh, after.members.admits)
                self._changed(
                    mesh,
                    "mesh.members",
                    admitted=[peer_id_of(k) for k in sorted(now - was)],
                    revoked=[peer_id_of(k) for k in sorted(was - now)],
                )
        return new

    def records_of(self, mesh: CID) -> list[SignedMeshRecord]:
        """A joined mesh's description and membership records, to send to a member."""
        joined = self._joined.get(mesh)
        return [] if joined is None else [joined.description, *joined.memberships]

    # --- catalogues ---------------------------------------------------------------------------

    def accept_catalogue(self, record: SignedCatalogue) -> bool:
        """Take a verified catalogue a peer sent if it is the latest of a member of a joined
        mesh, within the bounds of `CatalogueBook.offer`; True if taken."""
        joined = self._joined.get(record.body.mesh)
        if joined is None or record.body.author == self._identity.public_key:
            return False
        return self.catalogues.offer(record, self._now(), joined.members.admits)

    def forget_catalogue(self, mesh: CID, author: bytes) -> None:
        """`author` no longer names `mesh` to this node: it left, so it hosts nothing there."""
        if self.catalogues.drop(mesh, author):
            log.info("%s left mesh %s; its catalogue is dropped", peer_id_of(author), mesh)

    def catalogues_of(self, mesh: CID) -> list[SignedCatalogue]:
        """The catalogues to give a member of `mesh`: this node's own, then others'."""
        own = self._own.get(mesh)
        return ([] if own is None else [own]) + self.catalogues.of_mesh(mesh)

    def own_catalogue(self, mesh: CID) -> SignedCatalogue | None:
        return self._own.get(mesh)

    def hosts(self, mesh: CID) -> dict[CID, list[Host]]:
        """Each project listed in `mesh`'s catalogues (this node's own included), and who
        lists it."""
        out = self.catalogues.hosts(mesh)
        own = self._own.get(mesh)
        if own is not None:
            for entry in own.body.projects:
                out.setdefault(entry.project, []).insert(
                    0, Host(own.body.author, entry.name, own.body.ts)
                )
        return out

    def hosts_of(self, project: CID) -> list[tuple[bytes, tuple[str, ...]]]:
        """The other members that list `project` in a catalogue of a joined mesh, each with
        the addresses its catalogue gives (its newest such catalogue's), newest first."""
        found: dict[bytes, Host] = {}
        for joined in self._joined.values():
            for host in self.catalogues.hosts_of(joined.cid, project):
                held = found.get(host.author)
                if held is None or held.ts < host.ts:
                    found[host.author] = host
        newest = sorted(found.values(), key=lambda h: (-h.ts, h.author))
        return [(host.author, host.addrs) for host in newest]

    def expire_catalogues(self) -> int:
        return self.catalogues.expire(self._now())

    async def hosted_projects(self) -> list[tuple[CID, str, CID | None]]:
        """The projects this node follows whose genesis is here, oldest follow first: each
        with its name and the private mesh its genesis names (None: public). A project
        followed by CID and not here yet is not hosted, and not known to be public."""

        def read(store: Store) -> tuple[list[CID], dict[CID, tuple[str, CID | None]]]:
            follows = list(store.follows())
            unknown = [p for p in follows if p not in self._genesis]
            found: dict[CID, tuple[str, CID | None]] = {}
            for cid, record in store.get_records(unknown).items():
                body = record.body
                if isinstance(body, ProjectBody):
                    found[cid] = (body.name, body.mesh)
            return follows, found

        follows, found = await self._db(read)
        # Kept for the projects still followed only, so the cache is as large as the follows.
        known = {**self._genesis, **found}
        self._genesis = {p: known[p] for p in follows if p in known}
        return [(p, *self._genesis[p]) for p in follows if p in self._genesis]

    def refresh_own(
        self, hosted: Sequence[tuple[CID, str, CID | None]], addrs: Sequence[str] = ()
    ) -> list[SignedCatalogue]:
        """Sign this node's catalogue again for each joined mesh where it changed or is due
        for its hourly re-signing; return the new ones, for publishing. In a mesh, this node
        lists the public projects it hosts and the projects of that mesh when it is private;
        in a private mesh that does not admit it, nothing. `addrs` are the node's own
        addresses; those others can dial go into every catalogue (a change re-signs them)."""
        dialable = announceable_addrs(addrs)
        now = self._now()
        fresh: list[SignedCatalogue] = []
        for joined in self._joined.values():
            if not joined.members.admits(self._identity.public_key):
                self._own.pop(joined.cid, None)
                continue
            entries = fit_entries(
                CatalogueEntry(project, name)
                for project, name, home in hosted
                if home is None or home == joined.cid
            )
            current = self._own.get(joined.cid)
            if current is not None:
                if (
                    current.body.projects == entries
                    and current.body.addrs == dialable
                    and now - current.body.ts < CATALOGUE_REFRESH_MS
                ):
                    continue
                if now < current.body.ts + CATALOGUE_MIN_INTERVAL_MS:
                    continue  # readers would refuse it; the next refresh signs it
            body = Catalogue(self._identity.public_key, now, joined.cid, entries, dialable)
            self._own[joined.cid] = record = sign_catalogue(body, self._identity)
            fresh.append(record)
        return fresh
