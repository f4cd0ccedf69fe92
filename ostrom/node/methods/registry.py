"""The table of RPC methods, and the decorator that fills it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from ostrom.errors import InvalidInput, InvalidRecord
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


@contextmanager
def callers_input() -> Iterator[None]:
    """Report a record rule broken by values a caller passed as the caller's `InvalidInput`.

    Record constructors raise `InvalidRecord`, the error for bytes from elsewhere; when the
    values came from this RPC call, the call's parameters are what is wrong.
    """
    try:
        yield
    except InvalidRecord as exc:
        raise InvalidInput(exc.message) from None
