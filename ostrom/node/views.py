"""How records and states look to RPC clients: plain maps of strings, ints and lists.

CIDs are shown in text form, keys in hex with the matching peer id beside them.
"""

from __future__ import annotations

from typing import Any

from ostrom.crypto.keys import peer_id_of
from ostrom.protocol.acceptance import RecordStatus
from ostrom.protocol.records import (
    Comment,
    Contribution,
    Governance,
    Need,
    Project,
    SignedRecord,
    Validation,
)


def key_view(key: bytes) -> dict[str, str]:
    return {"key": key.hex(), "peer_id": peer_id_of(key)}


def record_view(record: SignedRecord) -> dict[str, Any]:
    body = record.body
    out: dict[str, Any] = {
        "cid": str(record.cid),
        "type": record.type,
        "author": body.author.hex(),
        "author_peer_id": peer_id_of(body.author),
        "ts": body.ts,
        "project": str(record.project),
        "size": len(record.data),
    }
    if isinstance(body, Project):
        out.update(
            name=body.name,
            description=body.description,
            license=body.license,
            policy={
                "maintainers": [key_view(key) for key in body.policy.maintainers],
                "quorum": body.policy.quorum,
            },
            fork_of=None
            if body.fork_of is None
            else {
                "project": str(body.fork_of.project),
                "heads": [str(cid) for cid in body.fork_of.heads],
            },
            mesh=None if body.mesh is None else str(body.mesh),
        )
    elif isinstance(body, Contribution):
        out.update(
            parents=[str(cid) for cid in body.parents],
            changesets=[str(cid) for cid in body.changes],
            message=body.message,
            resolves=[str(cid) for cid in body.resolves],
        )
    elif isinstance(body, Validation):
        out.update(target=str(body.target), verdict=body.verdict, note=body.note)
    elif isinstance(body, Governance):
        out.update(
            parents=[str(cid) for cid in body.parents],
            action=body.action,
            key=None if body.key is None else key_view(body.key),
            quorum=body.quorum,
            note=body.note,
        )
    elif isinstance(body, Need):
        out.update(title=body.title, body=body.body)
    elif isinstance(body, Comment):
        out.update(target=str(body.target), text=body.text)
    return out


def status_view(status: RecordStatus) -> dict[str, Any]:
    return {
        "status": status.status,
        "accepts": status.accepts,
        "rejects": status.rejects,
        "quorum": status.quorum,
        "votes": [
            {
                "validator": vote.validator.hex(),
                "validator_peer_id": peer_id_of(vote.validator),
                "verdict": vote.verdict,
                "validation": None if vote.validation is None else str(vote.validation),
                "implicit": vote.validation is None,
            }
            for vote in status.votes
        ],
        "waiting_on": [str(cid) for cid in status.waiting_on],
        "missing": [str(cid) for cid in status.missing],
    }
