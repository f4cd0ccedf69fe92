"""Which blocks a project needs: the changesets its contributions name, the manifests those
name, the file blocks those name; and which blocks of private meshes' work a project's
merges make its own.

Each takes the `Store` and runs on its worker thread, except the lookups for a few gossiped
contributions, which are brief enough for the event loop (`BlockWants.wanted_briefly`); the
replicator's completions and the RPC methods that make contributions both use them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from ostrom.crypto.cid import CID
from ostrom.node.store import Store
from ostrom.protocol.changesets import Changeset, FileManifest, Put
from ostrom.protocol.records import Contribution, Project


def wanted_blocks(
    store: Store, project: CID, phase: str, scope: Collection[CID] | None = None
) -> list[CID]:
    """The blocks `project` needs and this store lacks, for one phase of completion.

    Changesets first (they name the manifests), then manifests (they name the file
    blocks), then the file blocks themselves; contributions of upstream projects that the
    project's history reaches count too. With `scope`, only the blocks those records name:
    no walk of the history.
    """
    return BlockWants(project, scope).wanted(store, phase)


class BlockWants:
    """`wanted_blocks` for the phases of one pass, in order: what a phase reads from the
    store to find the next phase's blocks (the records' changesets, the manifests those
    name) is read once, not again by each later phase.

    Each phase also attributes to the project what it needs and the store already holds
    (a checkout fetched it, another project shares it), like what it fetches. That commit
    has no disk sync of its own: a crash that loses it leaves the blocks unattributed until
    the project's next completion, which attributes them again.
    """

    __slots__ = ("_changesets", "_known", "_manifests", "_project", "_scope")

    def __init__(
        self,
        project: CID,
        scope: Collection[CID] | None,
        known: Mapping[CID, tuple[CID, ...]] | None = None,
    ) -> None:
        """`known`: the changesets that contributions of `scope` name, when the caller has
        them decoded already (gossiped contributions, decoded as they arrived): those
        records are not read back from the store. They must be stored contributions."""
        self._project = project
        self._scope = scope
        self._known = known or {}
        self._changesets: list[CID] | None = None  # the records' changesets
        self._manifests: set[CID] | None = None  # what the changesets held name

    def wanted(self, store: Store, phase: str) -> list[CID]:
        if phase == "changesets":
            changesets = self._named_changesets(store)
            present = store.has_blocks(changesets)
            store.blocks.claim(self._project.raw, present, durable=False)
            return sorted(set(changesets) - present)
        manifests = self._named_manifests(store)
        present_manifests = store.has_blocks(manifests)
        if phase == "manifests":
            store.blocks.claim(self._project.raw, present_manifests, durable=False)
            return sorted(manifests - present_manifests)
        raw: set[CID] = set()
        for link in present_manifests:
            data = store.get_block(link)
            if data is not None:
                raw.update(ref.cid for ref in FileManifest.decode(data).blocks)
        store.blocks.claim(self._project.raw, raw, durable=False)
        return sorted(raw - store.has_blocks(raw))

    def wanted_briefly(self, store: Store, phase: str, budget: int) -> list[CID] | None:
        """`wanted` for a scope, unless that reads more than `budget` bytes in all (the
        scope's records, the changesets that name manifests, the manifests that name file
        blocks): then None, having read the indexes and at most `budget` bytes, so that the
        caller can run `wanted` where a long read blocks nothing (the store's worker
        thread). None too without a scope: that is a walk of the history."""
        if self._scope is None:
            return None  # the whole history
        reads = 0
        if self._changesets is None:
            reads += store.records_size(self._unknown())
            if reads > budget:
                return None
        if phase != "changesets" and self._manifests is None:
            reads += sum(store.blocks.sizes(self._named_changesets(store)).values())
            if reads > budget:
                return None
        if phase == "files":
            reads += sum(store.blocks.sizes(self._named_manifests(store)).values())
            if reads > budget:
                return None
        return self.wanted(store, phase)

    def _unknown(self) -> list[CID]:
        """The records of the scope whose changesets are read from the store."""
        return [cid for cid in self._scope or () if cid not in self._known]

    def _named_changesets(self, store: Store) -> list[CID]:
        if self._changesets is None:
            if self._scope is None:
                everything = store.project_history(self._project, ("contribution",))
            else:
                unknown = self._unknown()
                everything = store.get_records(unknown) if unknown else {}
            known = self._known
            self._changesets = [
                link for cid in self._scope or () if cid in known for link in known[cid]
            ]
            self._changesets += [
                link
                for r in everything.values()
                if isinstance(r.body, Contribution)
                for link in r.body.changes
            ]
        return self._changesets

    def _named_manifests(self, store: Store) -> set[CID]:
        """The manifests the changesets held name; read once the changesets phase is over
        (a later pass, with changesets fetched since, reads them again)."""
        if self._manifests is None:
            manifests: set[CID] = set()
            for link in store.has_blocks(self._named_changesets(store)):
                data = store.get_block(link)
                if data is not None:
                    manifests.update(
                        c.file for c in Changeset.decode(data).changes if isinstance(c, Put)
                    )
            self._manifests = manifests
        return self._manifests


def claim_merged_files(store: Store, project: CID) -> None:
    """Attribute to `project` the file blocks held here of the private meshes' work its
    contributions merge (`merged_work` of every parent outside the project's own
    contributions); changesets and manifests are claimed by every completion already."""
    own = store.project_records(project, ("contribution",))
    known = {record.cid for record in own}
    outside = {parent for record in own for parent in record.parents if parent not in known}
    merged = merged_work(store, project, outside)
    if merged:
        wanted_blocks(store, project, "files", merged)  # claims what is here, fetches nothing


def merged_work(store: Store, project: CID, parents: Iterable[CID]) -> list[CID]:
    """The records of private meshes' projects that a record of `project` naming `parents`
    merges: those parents that belong to another project whose genesis names a private
    mesh, and the stored records they reach without entering `project`'s own records.
    Empty for a record that names only its own project's records (nearly all of them), or
    merges only public work, whose blocks are served to anyone already.

    (A private fork's history ends in the records of the project it forked, where the walk
    stops; a private project of its own is walked to its genesis.)
    """
    foreign = [
        (parent, owner)
        for parent, owner in store.record_projects(parents).items()
        if owner != project
    ]
    if not foreign:
        return []
    private: dict[CID, bool] = {}
    start: set[bytes] = set()
    for parent, owner in foreign:
        if owner not in private:
            genesis = store.get_record(owner)
            private[owner] = (
                genesis is not None
                and isinstance(genesis.body, Project)
                and genesis.body.mesh is not None
            )
        if private[owner]:
            start.add(parent.raw)
    if not start:
        return []
    own = {cid.raw for cid in store.project_cids(project)}
    found, _ = store.reach(start, own.__contains__)
    return [CID(raw) for raw in found]


def merges_other_projects(store: Store, project: CID, parents: Iterable[CID]) -> bool:
    """Whether some of `parents` held here are records of another project than `project`:
    only a record naming such a parent can merge private work (`merged_work`). An index
    lookup; the records are not read."""
    return any(owner != project for owner in store.record_projects(parents).values())


def claim_merged_work(store: Store, project: CID, parents: Iterable[CID]) -> list[CID]:
    """Attribute to `project` every block held here of the private meshes' work that a
    record of `project` naming `parents` merges (`merged_work`), so that it is served to
    whoever may have the project; returns that work's records."""
    merged = merged_work(store, project, parents)
    if merged:
        plan = BlockWants(project, merged)
        for phase in ("changesets", "manifests", "files"):
            plan.wanted(store, phase)
    return merged
