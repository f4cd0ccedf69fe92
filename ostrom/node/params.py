"""Typed access to an RPC call's named parameters, with clear errors for wrong ones.

Ostrom methods take `params` as `[]` or `[{name: value, ...}]`. A method reads each
parameter it knows through one of the typed getters, then calls `done()`, which refuses any
name it did not read, so a misspelt option is an error rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Final

from ostrom.crypto.cid import CID
from ostrom.errors import DecodeError, InvalidInput

# Longest string parameter accepted; records bound their own fields more tightly.
MAX_STRING: Final = 1024 * 1024
# Longest list parameter: bounds the work one call can ask for.
MAX_LIST: Final = 100_000

_MISSING: Final = object()


class Params:
    def __init__(self, method: str, params: list[Any]) -> None:
        self.method = method
        if not params:
            self._values: dict[str, Any] = {}
        elif len(params) == 1 and isinstance(params[0], dict):
            self._values = params[0]
        else:
            raise InvalidInput(f"{method}: params must be [] or [{{name: value, ...}}]")
        self._read: set[str] = set()

    def _get(self, name: str, default: Any) -> Any:
        self._read.add(name)
        value = self._values.get(name, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise InvalidInput(f"{self.method}: missing parameter {name!r}")
            return default
        return value

    def text_or_integer(self, name: str, default: Any = _MISSING) -> Any:
        """A value given either way: a size or rate as text (`8GiB`) or as a number."""
        value = self._get(name, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self._wrong(name, "a number or a text such as 8GiB")
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise self._wrong(name, "a short text")
        return value

    def _wrong(self, name: str, expected: str) -> InvalidInput:
        return InvalidInput(f"{self.method}: parameter {name!r} must be {expected}")

    def text(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is default:
            return value
        if not isinstance(value, str) or len(value) > MAX_STRING:
            raise self._wrong(name, "a string")
        return value

    def integer(
        self, name: str, default: Any = _MISSING, *, minimum: int = 0, maximum: int = 2**63 - 1
    ) -> Any:
        value = self._get(name, default)
        if value is default:
            return value
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
            raise self._wrong(name, f"an integer from {minimum} to {maximum}")
        return value

    def flag(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self._wrong(name, "true or false")
        return value

    def array(self, name: str, default: Any = _MISSING, *, max_length: int = MAX_LIST) -> Any:
        value = self._get(name, default)
        if value is default:
            return value
        if not isinstance(value, list) or len(value) > max_length:
            raise self._wrong(name, f"a list of at most {max_length} items")
        return value

    def texts(self, name: str, default: Any = _MISSING) -> Any:
        value = self.array(name, default)
        if value is default:
            return value
        if not all(isinstance(item, str) for item in value):
            raise self._wrong(name, "a list of strings")
        return value

    def cids(self, name: str, default: Any = _MISSING) -> Any:
        """A list of full CIDs in text form (blocks are never named by prefix)."""
        value = self.texts(name, default)
        if value is default:
            return value
        try:
            return [CID.parse(item) for item in value]
        except DecodeError as exc:
            raise InvalidInput(f"{self.method}: {name}: {exc.message}") from None

    def done(self) -> None:
        unknown = set(self._values) - self._read
        if unknown:
            raise InvalidInput(f"{self.method}: unknown parameter(s) {', '.join(sorted(unknown))}")
