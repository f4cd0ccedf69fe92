"""The table of RPC methods, and the decorator that fills it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from ostrom.node.params import Params
from ostrom.node.rpc_server import RpcConnection

if TYPE_CHECKING:
    from ostrom.node.service import NodeService

# The record types that are nodes of a project's DAG and get a status.
DAG_TYPES: Final = ("contribution", "governance")
# Deepest fork lineage followed (`project.forks`, `car.export`); a longer chain is cut.
MAX_FORK_DEPTH: Final = 64

Handler = Callable[["NodeService", Params, RpcConnection], Awaitable[Any]]
METHODS: dict[str, Handler] = {}


def method(name: str) -> Callable[[Handler], Handler]:
    """Register the decorated coroutine as the RPC method `name`."""

    def register(fn: Handler) -> Handler:
        if name in METHODS:
            raise RuntimeError(f"RPC method {name} registered twice")
        METHODS[name] = fn
        return fn

    return register
