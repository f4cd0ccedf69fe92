"""docs/RPC.md documents exactly the methods the daemon serves."""

from __future__ import annotations

import re
from pathlib import Path

import ostrom.node.methods  # noqa: F401  (registers every method)
from ostrom.node.events import EVENT_TYPES
from ostrom.node.methods.registry import METHODS

RPC_DOC = Path(__file__).resolve().parent.parent / "docs" / "RPC.md"


def documented_methods() -> set[str]:
    text = RPC_DOC.read_text()
    table = text[text.index("## Methods") : text.index("## Events")]
    first_cells = re.findall(r"^\| ((?:`[a-z_.]+`(?:, )?)+) \|", table, flags=re.MULTILINE)
    return {name for cell in first_cells for name in re.findall(r"`([a-z_.]+)`", cell)}


def test_every_method_is_documented_and_every_documented_method_exists() -> None:
    assert documented_methods() == set(METHODS)


def documented_events() -> set[str]:
    text = RPC_DOC.read_text()
    table = text[text.index("## Events") :].split("\n\n", 2)[1]
    first_cells = re.findall(r"^\| ((?:`[a-z_.]+`(?:, )?)+) \|", table, flags=re.MULTILINE)
    return {name for cell in first_cells for name in re.findall(r"`([a-z_.]+)`", cell)}


def test_every_event_type_is_documented_and_every_documented_one_is_published() -> None:
    assert documented_events() == EVENT_TYPES
