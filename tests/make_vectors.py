"""Generate the test vectors of docs/PROTOCOL.md (section 12) from the implementation.

    .venv/bin/python tests/make_vectors.py

prints the markdown of every vector. Paste it between the `vectors:begin` and `vectors:end`
markers of docs/PROTOCOL.md; tests/test_protocol_vectors.py fails until the document and this
output agree, and it checks every vector in the document against the code independently.

Everything here is fixed: two identities from fixed seeds, fixed timestamps, fixed texts.
Ed25519 signatures are deterministic (RFC 8032), so the output never changes unless the
encoding or the signing rules do.
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ostrom.crypto.cid import CID
from ostrom.crypto.keys import KEY_FILE_TAG, Identity
from ostrom.protocol import dagcbor, records
from ostrom.protocol.car import encode_header, encode_section
from ostrom.protocol.changesets import Changeset, Delete, Put
from ostrom.protocol.chunking import chunk_bytes
from ostrom.protocol.records import (
    Comment,
    Contribution,
    ForkOf,
    Governance,
    Need,
    Policy,
    Project,
    SignedRecord,
    Validation,
)

SEED_A = bytes(range(32))
SEED_B = bytes(range(32, 64))
# 2025-01-01T00:00:00Z in milliseconds; each record is one minute after the previous one.
T0 = 1_735_689_600_000
MINUTE = 60_000
FILE_BYTES = b"hello, commons\n"


@dataclass
class Vector:
    """One vector: a name, `key: value` lines, and the DAG-JSON form of dag-cbor bytes."""

    name: str
    title: str
    lines: list[tuple[str, str]]
    dag_json: Any = None
    notes: list[str] = field(default_factory=list)


def to_dag_json(value: Any) -> Any:
    """The DAG-JSON data model form of a decoded value (bytes and links as `/` maps)."""
    if isinstance(value, CID):
        return {"/": str(value)}
    if isinstance(value, bytes):
        return {"/": {"bytes": base64.b64encode(value).decode("ascii").rstrip("=")}}
    if isinstance(value, list):
        return [to_dag_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_dag_json(item) for key, item in value.items()}
    return value


def _record_vector(name: str, title: str, seed: bytes, record: SignedRecord) -> Vector:
    payload = records.signing_payload(record.body)
    return Vector(
        name=name,
        title=title,
        lines=[
            ("kind", "record"),
            ("type", record.type),
            ("seed", seed.hex()),
            ("cid", str(record.cid)),
            ("payload", payload.hex()),
            ("sig", record.sig.hex()),
            ("record", record.data.hex()),
        ],
        dag_json=to_dag_json(dagcbor.decode(record.data)),
    )


def _block_vector(name: str, title: str, data: bytes) -> Vector:
    cid = CID.of_dag_cbor(data)
    return Vector(
        name=name,
        title=title,
        lines=[("kind", "dag-cbor-block"), ("cid", str(cid)), ("data", data.hex())],
        dag_json=to_dag_json(dagcbor.decode(data)),
    )


def build() -> list[Vector]:
    """Every vector, in the order the document lists them."""
    a = Identity.from_seed(SEED_A)
    b = Identity.from_seed(SEED_B)
    out: list[Vector] = []
    for name, seed, identity in (("identity-a", SEED_A, a), ("identity-b", SEED_B, b)):
        key_line = f"{KEY_FILE_TAG} {base64.b64encode(seed).decode('ascii')}"
        out.append(
            Vector(
                name=name,
                title=f"identity from seed {seed[0]:02x}..{seed[-1]:02x}",
                lines=[
                    ("kind", "identity"),
                    ("seed", seed.hex()),
                    ("public-key", identity.public_key.hex()),
                    ("peer-id", identity.peer_id),
                    ("key-file", key_line),
                ],
            )
        )

    blocks, _, manifest_data, manifest_cid = chunk_bytes(FILE_BYTES)
    ((raw_cid, raw_data),) = blocks
    out.append(
        Vector(
            name="raw-block",
            title="a raw file block: the bytes `hello, commons\\n`",
            lines=[("kind", "raw-block"), ("cid", str(raw_cid)), ("data", raw_data.hex())],
        )
    )
    out.append(_block_vector("manifest", "the file manifest of that one-block file", manifest_data))
    changeset = Changeset(
        (Put(path="docs/hello.txt", file=manifest_cid, size=len(FILE_BYTES), exec=False),)
    )
    changeset_data = changeset.encode()
    changeset_cid = CID.of_dag_cbor(changeset_data)
    out.append(_block_vector("changeset", "a changeset putting that file", changeset_data))
    delete_data = Changeset(
        (Delete(path="docs/hello.txt"), Delete(path="docs/naïve notes.md"))
    ).encode()
    out.append(
        _block_vector(
            "changeset-delete",
            "a changeset of two deletes (not used by the records below)",
            delete_data,
        )
    )

    policy = Policy(maintainers=(a.public_key,), quorum=1)
    genesis = records.sign(
        Project(
            author=a.public_key,
            ts=T0,
            name="Commons Demo",
            description="A project used for the protocol test vectors.",
            license="MIT OR Apache-2.0",
            policy=policy,
        ),
        a,
    )
    g = genesis.cid
    need = records.sign(
        Need(
            author=a.public_key,
            ts=T0 + MINUTE,
            project=g,
            title="Say hello",
            body="The project needs a greeting file.",
        ),
        a,
    )
    contribution = records.sign(
        Contribution(
            author=b.public_key,
            ts=T0 + 2 * MINUTE,
            project=g,
            parents=(g,),
            changes=(changeset_cid,),
            message="Add docs/hello.txt",
            resolves=(need.cid,),
        ),
        b,
    )
    validation = records.sign(
        Validation(
            author=a.public_key,
            ts=T0 + 3 * MINUTE,
            project=g,
            target=contribution.cid,
            verdict="accept",
            note="Thanks!",
        ),
        a,
    )
    governance = records.sign(
        Governance(
            author=a.public_key,
            ts=T0 + 4 * MINUTE,
            project=g,
            parents=(contribution.cid,),
            action="add-maintainer",
            key=b.public_key,
            note="Welcome aboard.",
        ),
        a,
    )
    comment = records.sign(
        Comment(
            author=b.public_key,
            ts=T0 + 5 * MINUTE,
            project=g,
            target=need.cid,
            text="Done in my contribution.",
        ),
        b,
    )
    fork = records.sign(
        Project(
            author=b.public_key,
            ts=T0 + 6 * MINUTE,
            name="Commons Demo (B's fork)",
            description="",
            license="MIT OR Apache-2.0",
            policy=Policy(maintainers=(b.public_key,), quorum=1),
            fork_of=ForkOf(project=g, heads=(governance.cid,)),
        ),
        b,
    )
    out += [
        _record_vector("genesis", "project genesis by A", SEED_A, genesis),
        _record_vector("need", "need by A", SEED_A, need),
        _record_vector(
            "contribution",
            "contribution by B: parent genesis, the changeset above, resolves the need",
            SEED_B,
            contribution,
        ),
        _record_vector(
            "validation", "validation by A accepting the contribution", SEED_A, validation
        ),
        _record_vector(
            "governance",
            "governance by A: add-maintainer B, parent the contribution",
            SEED_A,
            governance,
        ),
        _record_vector("comment", "comment by B on the need", SEED_B, comment),
        _record_vector(
            "fork-genesis", "B's fork of the project at the governance record", SEED_B, fork
        ),
    ]

    # The CAR export of project G: genesis records first, then the other records by
    # (ts, CID bytes), then per contribution its changesets, manifests and raw blocks.
    ordered = sorted(
        (genesis, need, contribution, validation, governance, comment),
        key=lambda r: (r.type != "project", r.ts, r.cid.raw),
    )
    sections: list[tuple[str, CID, bytes]] = [
        (r.type if r.type != "project" else "genesis", r.cid, r.data) for r in ordered
    ]
    sections += [
        ("changeset", changeset_cid, changeset_data),
        ("manifest", manifest_cid, manifest_data),
        ("raw-block", raw_cid, raw_data),
    ]
    car = encode_header([g]) + b"".join(encode_section(cid, data) for _, cid, data in sections)
    out.append(
        Vector(
            name="car",
            title="the CAR export of the project (roots: the genesis)",
            lines=[
                ("kind", "car"),
                ("roots", "genesis"),
                ("sections", " ".join(name for name, _, _ in sections)),
                ("car", car.hex()),
            ],
        )
    )
    return out


def render(vectors: list[Vector]) -> str:
    """The markdown of `vectors`: a heading, a `vector` block, and a `dag-json` block if any."""
    parts: list[str] = []
    for vector in vectors:
        parts.append(f"### vector: {vector.name}\n\n{vector.title[0].upper()}{vector.title[1:]}.\n")
        body = "\n".join(f"{key}: {value}" for key, value in vector.lines)
        parts.append(f"```vector\nname: {vector.name}\n{body}\n```\n")
        if vector.dag_json is not None:
            text = json.dumps(vector.dag_json, indent=2, sort_keys=True, ensure_ascii=False)
            parts.append(f"```dag-json\n{text}\n```\n")
    return "\n".join(parts)


def main() -> None:
    sys.stdout.write(render(build()))


if __name__ == "__main__":
    main()
