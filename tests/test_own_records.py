"""A record this node signs: handed to gossip before its disk sync, on disk when the call
that made it returns."""

from __future__ import annotations

from collections.abc import Sequence

from ostrom.node.service import NodeService
from ostrom.protocol.records import Need, SignedRecord
from tests.test_blocks_serving import genesis


async def test_a_signed_record_is_told_to_listeners_before_its_sync_and_is_on_disk_at_return(
    service: NodeService,
) -> None:
    project = genesis("recipes", None)
    await service.store_new([project], "import")
    told: list[tuple[str, bool]] = []

    def listener(records: Sequence[SignedRecord], origin: str) -> None:
        told.append((origin, service.store.unsynced))

    service.record_listeners.append(listener)
    body = Need(author=service.identity.public_key, ts=2_000, project=project.cid, title="a logo")
    record = await service.sign_and_store(body)

    # The replicator (a listener) queued it for gossip while it was not yet on disk ...
    assert told == [("local", True)]
    # ... and it was by the time the call returned.
    assert not service.store.unsynced
    assert service.store.get_record(record.cid) == record
