"""NodeService.resolve_project: what it remembers, and what it asks the store again."""

from __future__ import annotations

import pytest

from ostrom.errors import Ambiguous
from ostrom.node.service import NodeService
from ostrom.protocol.records import Policy, Project, sign
from tests.test_blocks_serving import (  # noqa: F401 (`service` is the fixture)
    STEWARD,
    count_store_calls,
    genesis,
    service,
)


async def test_a_project_named_by_its_cid_is_read_once_and_a_name_each_time(
    service: NodeService,  # noqa: F811
) -> None:
    first = genesis("recipes", None)
    await service.db(lambda store: store.put_records([first]))
    reads = count_store_calls(service)
    assert (await service.resolve_project(str(first.cid))).cid == first.cid
    assert (await service.resolve_project(str(first.cid))).cid == first.cid
    assert len(reads) == 1
    assert (await service.resolve_project("recipes")).cid == first.cid
    assert len(reads) == 2

    # A second project of that name arrives: the name no longer says which, the CID still does.
    body = Project(
        author=STEWARD.public_key,
        ts=2_000,
        name="recipes",
        license="MIT",
        policy=Policy(maintainers=(STEWARD.public_key,)),
    )
    service.store.put_records([sign(body, STEWARD)])  # directly: not counted
    with pytest.raises(Ambiguous):
        await service.resolve_project("recipes")
    assert (await service.resolve_project(str(first.cid))).cid == first.cid
