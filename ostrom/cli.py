"""The `ostrom` command: a thin client of the daemon's RPC socket.

Only `init` and `id` work without a daemon (they touch nothing but the key file); `daemon`
replaces this process with the daemon's own (`python -m ostrom.node`), so the CLI never
loads the node, SQLite or libp2p and every other command returns in a fraction of a second.

Exit codes: 0 success, 1 an error the daemon or this command reported, 2 a usage error,
3 no daemon running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

from ostrom import __version__
from ostrom.datadir import DataDir, init_data_dir, resolve_data_dir
from ostrom.errors import DaemonNotRunning, OstromError

EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_NO_DAEMON: Final = 3
# How many characters of a CID lists show: past the shared `bafyrei` prefix, 13 base32
# characters (65 bits) keep collisions out of any realistic project.
SHORT_CID: Final = 20


# --- output helpers ----------------------------------------------------------------------------


class Output:
    """Human text or `--json`, and a progress bar on a terminal's stderr."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        self._progress_shown = False
        self._last_draw = 0.0

    def result(self, value: Any, human: Callable[[Any], None]) -> None:
        if self.json:
            json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
            sys.stdout.write("\n")
        else:
            human(value)

    def line(self, text: str = "") -> None:
        print(text)

    def progress(self, label: str) -> Callable[[int, int], None] | None:
        if self.json or not sys.stderr.isatty():
            return None

        def draw(done: int, total: int) -> None:
            now = time.monotonic()
            if done < total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            width = 30
            fraction = done / total if total else 1.0
            filled = int(width * fraction)
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\r{label} [{bar}] {fraction:6.1%} {_size(done)}/{_size(total)}")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()

        return draw


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def _short(cid: str | None) -> str:
    return (cid or "-")[:SHORT_CID]


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts / 1000))


def _peer(view: dict[str, Any], key: str = "author_peer_id") -> str:
    peer = str(view.get(key, ""))
    return peer[:8] + "…" + peer[-6:] if len(peer) > 16 else peer


# --- commands that work without a daemon -------------------------------------------------------


def cmd_init(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    identity, created = init_data_dir(data_dir)
    value = {
        "data_dir": str(data_dir.root),
        "peer_id": identity.peer_id,
        "public_key": identity.public_key.hex(),
        "created": created,
    }

    def human(v: dict[str, Any]) -> None:
        if created:
            out.line(f"created identity {v['peer_id']} in {v['data_dir']}")
        else:
            out.line(f"already initialised: identity {v['peer_id']} in {v['data_dir']} (kept)")

    out.result(value, human)


def cmd_id(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    identity = data_dir.identity()
    value = {"peer_id": identity.peer_id, "public_key": identity.public_key.hex()}

    def human(v: dict[str, Any]) -> None:
        out.line(f"peer id     {v['peer_id']}")
        out.line(f"public key  {v['public_key']}")

    out.result(value, human)


def cmd_daemon(args: argparse.Namespace, out: Output, data_dir: DataDir) -> NoReturn:
    # Every other flag (--listen, limits, --help, ...) belongs to the daemon's own parser.
    argv = [sys.executable, "-m", "ostrom.node", "--data-dir", str(data_dir.root), *args.extra]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


# --- commands that talk to the daemon ----------------------------------------------------------


def _client(data_dir: DataDir) -> Any:
    from ostrom.client import Client

    return Client(data_dir.root)


def cmd_peers(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.peers()

    def human(peers: list[dict[str, Any]]) -> None:
        if not peers:
            out.line("no peers connected")
        for p in peers:
            out.line(p["peer_id"])
            for addr in p["addrs"]:
                out.line(f"  at       {addr}")
            for project in p["projects"]:
                out.line(f"  shares   {project}")

    out.result(value, human)


def cmd_connect(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.connect(args.addr)
    out.result(value, lambda v: out.line(f"connected to {v['peer_id']}"))


def _limit(n: int) -> str:
    return "no limit" if not n else _size(n)


def _print_limits(out: Output, limits: dict[str, Any]) -> None:
    for name, label in (("upload_rate", "upload"), ("download_rate", "download")):
        if name in limits:
            v = limits[name]
            out.line(
                f"{label:<11} {_size(v['bytes_per_s'])}/s now, limit {_limit(v['limit'])}"
                f"{'/s' if v['limit'] else ''} ({_size(v['bytes'])} since start)"
            )
    if "storage" in limits:
        v = limits["storage"]
        evictable = f" ({_size(v['evictable'])} evictable)" if v.get("evictable") else ""
        out.line(f"storage     {_size(v['used'])} used{evictable}, limit {_limit(v['limit'])}")
    if "project_storage" in limits:
        v = limits["project_storage"]
        out.line(
            f"per project {_size(v.get('used', 0))} in the largest, limit {_limit(v['limit'])}"
        )
    if "max_peers" in limits:
        v = limits["max_peers"]
        out.line(f"peer limit  {v['used']} of {v['limit']}")


def cmd_limits(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    changes = {
        name: value
        for name, value in (
            ("upload_rate", args.upload_rate),
            ("download_rate", args.download_rate),
            ("storage", args.storage),
            ("project_storage", args.project_storage),
            ("max_peers", args.max_peers),
        )
        if value is not None
    }
    with _client(data_dir) as client:
        value = client.set_limits(**changes) if changes else client.limits()
    out.result(value, lambda v: _print_limits(out, v))


def cmd_status(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.status()

    def human(v: dict[str, Any]) -> None:
        store = v["store"]
        out.line(f"daemon      running (pid {v['pid']}, up {v['uptime_s']:.0f} s, v{v['version']})")
        out.line(f"peer id     {v['peer_id']}")
        out.line(f"data dir    {v['data_dir']}")
        for addr in v.get("addresses", []):
            out.line(f"listening   {addr}")
        out.line(f"peers       {v.get('peers', 0)}")
        out.line(f"projects    {store['projects']}")
        out.line(f"records     {store['records']}")
        out.line(f"blocks      {store['blocks']} ({_size(store['block_bytes'])})")
        out.line(f"database    {_size(store['db_bytes'])}")
        _print_limits(out, v.get("limits", {}))
        for t in v.get("transfers", []):
            out.line(
                f"transfer    {t['purpose']} of {_short(t['project'])}: {t['fetched']}/"
                f"{t['wanted']} blocks, {_size(t['bytes'])} at {_size(t['bytes_per_s'])}/s"
            )

    out.result(value, human)


def _print_project(out: Output, v: dict[str, Any]) -> None:
    out.line(f"project     {v['name']}")
    out.line(f"cid         {v['cid']}")
    out.line(f"license     {v['license']}")
    if v.get("description"):
        out.line(f"description {v['description']}")
    out.line(f"founder     {v['author_peer_id']}")
    out.line(f"created     {_when(v['ts'])}")
    policy = v["current_policy"]
    out.line(f"quorum      {policy['quorum']}")
    for m in policy["maintainers"]:
        out.line(f"maintainer  {m['peer_id']}")
    if v.get("fork_of"):
        out.line(f"fork of     {v['fork_of']['project']}")
    if v.get("mesh"):
        out.line(f"mesh        {v['mesh']} (private: served to its members only)")
    counts = v["records"]
    out.line(
        f"records     {counts['accepted']} accepted, {counts['pending']} pending, "
        f"{counts['rejected']} rejected"
    )
    for head in v["heads"]:
        out.line(f"head        {head}")
    for key in ("forks", "needs"):
        if key in v:
            out.line(f"{key:<11} {v[key]}")


def cmd_project_create(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.create_project(
            args.name,
            license=args.license,
            description=args.description or "",
            quorum=args.quorum,
            maintainers=args.maintainer or [],
            mesh=args.mesh,
        )
    out.result(value, lambda v: _print_project(out, v))


def cmd_project_list(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.projects()

    def human(projects: list[dict[str, Any]]) -> None:
        if not projects:
            out.line(
                "no projects yet (create one with `ostrom project create NAME --license SPDX`)"
            )
            return
        out.line(f"{'NAME':<24} {'CID':<{SHORT_CID}} {'LICENSE':<20} ACCEPTED PENDING FORK FOLLOW")
        for p in projects:
            counts = p["records"]
            fork = "yes" if p.get("fork_of") else ""
            out.line(
                f"{p['name'][:24]:<24} {_short(p['cid']):<{SHORT_CID}} "
                f"{p['license'][:20]:<20} {counts['accepted']:>8} {counts['pending']:>7} {fork}"
            )

    out.result(value, human)


def cmd_project_show(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.project(args.project)
    out.result(value, lambda v: _print_project(out, v))


def cmd_contribute(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.contribute(
            args.project,
            [Path(p) for p in args.paths],
            message=args.message,
            to=args.to or "",
            deletes=args.delete or [],
            resolves=args.resolves or [],
            parents=args.parent or [],
            progress=out.progress("uploading"),
        )

    def human(v: dict[str, Any]) -> None:
        out.line(f"contribution {v['cid']}")
        out.line(
            f"  {v['paths']} path(s) changed, status {v.get('status', 'pending')}"
            + (f" ({v['accepts']}/{v['quorum']} acceptances)" if "quorum" in v else "")
        )
        if v.get("uploaded_bytes") is not None:
            out.line(
                f"  uploaded {_size(v['uploaded_bytes'])}, "
                f"{_size(v['deduplicated_bytes'])} not sent (already stored)"
            )

    out.result(value, human)


def cmd_log(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.log(args.project, limit=args.limit)

    def human(entries: list[dict[str, Any]]) -> None:
        for e in entries:
            status = e.get("status", "")
            what = e["type"]
            out.line(f"{what} {e['cid']}  [{status}]")
            out.line(f"  author  {e['author_peer_id']}")
            out.line(f"  date    {_when(e['ts'])}")
            if e.get("parents"):
                out.line(f"  parents {' '.join(_short(p) for p in e['parents'])}")
            if what == "contribution":
                out.line(f"  message {e['message'].splitlines()[0] if e['message'] else ''}")
            elif what == "governance":
                detail = e["key"]["peer_id"] if e.get("key") else e.get("quorum")
                out.line(f"  action  {e['action']} {detail}")
            elif what == "project":
                out.line(f"  genesis {e['name']} ({e['license']})")
            if "quorum" in e and what != "project":
                out.line(
                    f"  votes   {e['accepts']} accept, {e['rejects']} reject, quorum {e['quorum']}"
                )
            for v in e.get("validations", []):
                counted = "" if v["counted"] else " (not counted)"
                note = f": {v['note']}" if v.get("note") else ""
                out.line(f"    {v['verdict']:<6} by {_peer(v)}{counted}{note}")
            if e.get("missing"):
                out.line(f"  missing parents {' '.join(_short(p) for p in e['missing'])}")
            out.line()

    out.result(value, human)


def cmd_validate(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    verdict = "accept" if args.accept else "reject"
    with _client(data_dir) as client:
        value = client.validate(args.record, verdict, note=args.note or "")

    def human(v: dict[str, Any]) -> None:
        out.line(f"validation {v['cid']}: {v['verdict']} {v['target']}")
        target = v.get("target_status")
        if target:
            out.line(
                f"  target is now {target['status']} ({target['accepts']} accept, "
                f"{target['rejects']} reject, quorum {target['quorum']})"
            )
        if v.get("warning"):
            out.line(f"  warning: {v['warning']}")

    out.result(value, human)


def _print_conflicts(out: Output, conflicts: list[dict[str, Any]]) -> None:
    for c in conflicts:
        others = [cand for cand in c["candidates"] if cand != c["chosen"]]
        out.line(
            f"conflict: {c['path']}: concurrent changes by "
            f"{', '.join(_short(x) for x in c['candidates'])}; showing {_short(c['chosen'])}"
            f" (over {', '.join(_short(x) for x in others)})"
        )


def cmd_tree(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.tree(args.project, at=args.at)

    def human(v: dict[str, Any]) -> None:
        for f in v["files"]:
            mode = "x" if f["exec"] else "-"
            out.line(f"{mode} {f['size']:>12}  {f['path']}")
        out.line(f"{len(v['files'])} file(s), {_size(sum(f['size'] for f in v['files']))}")
        _print_conflicts(out, v["conflicts"])

    out.result(value, human)


def cmd_checkout(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.checkout(
            args.project,
            Path(args.dir),
            at=args.at,
            overwrite=args.force,
            progress=out.progress("checking out"),
            fetch_progress=out.progress("fetching blocks"),
        )

    def human(v: dict[str, Any]) -> None:
        out.line(f"checked out {v['files']} file(s), {_size(v['bytes'])} into {v['dir']}")
        _print_conflicts(out, v["conflicts"])

    out.result(value, human)


def cmd_fork(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.fork(args.project, args.name, at=args.at or [])
    out.result(value, lambda v: _print_project(out, v))


def cmd_follow(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.follow(args.project, records_only=args.records_only)

    def human(v: dict[str, Any]) -> None:
        how = "records only, blocks on demand" if v["mode"] == "records" else "records and blocks"
        out.line(f"following {v['project']} ({how})")
        if not v["present"]:
            out.line("  not here yet: it will be fetched from peers that have it")

    out.result(value, human)


def cmd_unfollow(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.unfollow(args.project)
    out.result(value, lambda v: out.line(f"no longer following {v['project']}"))


def cmd_forks(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.forks(args.project)

    def human(v: dict[str, Any]) -> None:
        out.line(f"{v['name']} {v['project']}")
        for depth, up in enumerate(v["upstream"], start=1):
            name = up.get("name", "(not here)")
            out.line(
                f"{'  ' * depth}forked from {name} {up['project']} at "
                f"{', '.join(_short(h) for h in up['at'])}"
            )

        def down(forks: list[dict[str, Any]], depth: int) -> None:
            for f in forks:
                out.line(
                    f"{'  ' * depth}fork {f['name']} {f['project']} by {_peer(f)} at "
                    f"{', '.join(_short(h) for h in f['at'])}"
                )
                down(f["forks"], depth + 1)

        if not v["forks"]:
            out.line("  no forks known here")
        down(v["forks"], 1)

    out.result(value, human)


def cmd_governance(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    key = args.value if args.action != "set-quorum" else None
    quorum = None
    if args.action == "set-quorum":
        try:
            quorum = int(args.value)
        except ValueError:
            _usage(f"set-quorum takes a number, not {args.value!r}")
    with _client(data_dir) as client:
        value = client.governance(
            args.project, args.action, key=key, quorum=quorum, note=args.note or ""
        )

    def human(v: dict[str, Any]) -> None:
        out.line(f"governance {v['cid']}: {v['action']} [{v.get('status', 'pending')}]")

    out.result(value, human)


def cmd_need_create(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.create_need(args.project, args.title, body=args.body or "")
    out.result(value, lambda v: out.line(f"need {v['cid']}: {v['title']}"))


def cmd_need_list(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.needs(args.project)

    def human(needs: list[dict[str, Any]]) -> None:
        if not needs:
            out.line("no needs")
        for n in needs:
            out.line(f"[{n['status']:<8}] {_short(n['cid'])} {n['title']}")
            for r in n["resolved_by"]:
                out.line(f"             resolved by {_short(r['record'])} ({r['status']})")

    out.result(value, human)


def _print_mesh(out: Output, v: dict[str, Any]) -> None:
    role = "steward" if v["steward"] else "member" if v["member"] else "not admitted"
    out.line(f"mesh {v['name']} ({v['access']}, you: {role})")
    out.line(f"  cid        {v['cid']}")
    if v["description"]:
        out.line(f"  about      {v['description']}")
    for steward in v["stewards"]:
        out.line(f"  steward    {steward}")
    if "members" in v:
        out.line(f"  members    {v['members']}")
    for member in v.get("admitted", []):
        out.line(f"  admitted   {member}")
    for addr in v["bootstrap"]:
        out.line(f"  bootstrap  {addr}")
    if "projects" in v:
        _print_mesh_projects(out, v["projects"], v["projects_total"], v["name"])


def _print_mesh_projects(
    out: Output, projects: list[dict[str, Any]], total: int, mesh: str
) -> None:
    """The projects a mesh's members host: name, full CID (what `ostrom follow` takes), how
    many host it and how many of those are connected, and whether this node follows it."""
    if not projects:
        out.line("  projects   none announced yet")
        return
    out.line(f"  projects   {total} hosted in this mesh")
    for p in projects:
        connected = sum(1 for h in p["hosts"] if h["connected"])
        hosts = f"{p['host_count']} host{'s' if p['host_count'] != 1 else ''}"
        if any(h["self"] for h in p["hosts"]):
            hosts += ", this node among them"
        elif connected:
            hosts += f", {connected} connected"
        mark = f"following ({p['following']})" if p["following"] else "not followed"
        out.line(f"    {p['name']}  {p['project']}")
        out.line(f"        {hosts}; {mark}")
    if total > len(projects):
        out.line(f"    ... {total - len(projects)} more: `ostrom mesh projects {mesh}`")


def cmd_mesh_create(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.create_mesh(
            args.name,
            private=args.private,
            description=args.description or "",
            bootstrap=args.bootstrap,
            stewards=args.steward or (),
        )
    out.result(value, lambda v: _print_mesh(out, v))


def cmd_mesh_invite(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.mesh_invite(args.mesh)
    out.result({"invite": value}, lambda v: out.line(v["invite"]))


def cmd_mesh_join(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.join_mesh(args.invite)

    def human(v: dict[str, Any]) -> None:
        _print_mesh(out, v)
        for peer in v["connected"]:
            out.line(f"  connected  {peer}")
        for failed in v["unreachable"]:
            out.line(f"  unreachable {failed['addr']}: {failed['reason']}")

    out.result(value, human)


def cmd_mesh_list(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.meshes()

    def human(meshes: list[dict[str, Any]]) -> None:
        if not meshes:
            out.line("in no mesh (create one with `ostrom mesh create`, or `ostrom mesh join`)")
        for m in meshes:
            out.line(f"{_short(m['cid'])}  {m['name']}  ({m['access']})")

    out.result(value, human)


def cmd_mesh_show(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.mesh(args.mesh)
    out.result(value, lambda v: _print_mesh(out, v))


def cmd_mesh_projects(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.mesh_projects(args.mesh, limit=args.limit)
    out.result(value, lambda v: _print_mesh_projects(out, v["projects"], v["total"], v["name"]))


def cmd_mesh_leave(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.leave_mesh(args.mesh)
    out.result(value, lambda v: out.line(f"left mesh {v['name']}"))


def cmd_mesh_admit(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        if args.command_name == "admit":
            value = client.admit(args.mesh, args.peer, note=args.note or "")
        else:
            value = client.revoke(args.mesh, args.peer, note=args.note or "")
    out.result(value, lambda v: out.line(f"{v['action']} {v['member']} ({v['cid']})"))


def cmd_comment(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.comment(args.record, args.text)
    out.result(value, lambda v: out.line(f"comment {v['cid']} on {v['target']}"))


def cmd_show(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.show(args.record)

    def human(v: dict[str, Any]) -> None:
        skip = {"validations", "comments", "changes", "votes"}
        for key, item in v.items():
            if key not in skip:
                out.line(
                    f"{key:<14} {json.dumps(item) if isinstance(item, (dict, list)) else item}"
                )
        for c in v.get("changes", []):
            detail = f"{c['size']} bytes" if c["op"] == "put" else ""
            out.line(f"  {c['op']:<6} {c['path']} {detail}")
        for val in v.get("validations", []):
            out.line(f"  validation {val['verdict']} by {_peer(val)}: {val.get('note', '')}")
        for com in v.get("comments", []):
            out.line(f"  comment by {_peer(com)}: {com['text']}")

    out.result(value, human)


def cmd_export(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.export_car(args.project, Path(args.file), progress=out.progress("exporting"))
    out.result(
        value,
        lambda v: out.line(
            f"wrote {v['records']} record(s) and {v['blocks']} block(s), {_size(v['bytes'])}, "
            f"to {v['file']}"
        ),
    )


def cmd_import(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        value = client.import_car(Path(args.file), progress=out.progress("importing"))

    def human(v: dict[str, Any]) -> None:
        out.line(
            f"imported {v['stored']} new record(s) ({v['known']} already here), "
            f"{v['blocks_stored']} new block(s)"
        )
        for r in v["refused"]:
            out.line(f"refused {r.get('cid') or '#' + str(r['index'])}: {r['message']}")

    out.result(value, human)
    if value["refused"]:
        sys.exit(EXIT_ERROR)


def cmd_events(args: argparse.Namespace, out: Output, data_dir: DataDir) -> None:
    with _client(data_dir) as client:
        try:
            for event in client.events(args.types):
                if out.json:
                    print(json.dumps(event, sort_keys=True, default=str), flush=True)
                else:
                    print(_event_line(event), flush=True)
        except KeyboardInterrupt:
            return


def _event_line(event: dict[str, Any]) -> str:
    kind = event.get("type", "?")
    if kind == "record.added":
        r = event["record"]
        return f"{kind} {r['type']} {r['cid']} by {_peer(r)} ({event.get('origin')})"
    if kind == "status.changed":
        return f"{kind} {event['record']} {event.get('was')} -> {event['status']}"
    if kind in ("blocks.progress", "blocks.done"):
        missing = f", {event['missing']} missing" if event.get("missing") else ""
        return (
            f"{kind} {event['purpose']} of {_short(event['project'])}: {event['fetched']}/"
            f"{event['wanted']} blocks, {_size(event['bytes'])}{missing}"
        )
    return f"{kind} {json.dumps({k: v for k, v in event.items() if k != 'type'}, default=str)}"


# --- argument parsing --------------------------------------------------------------------------


def _usage(message: str) -> NoReturn:
    print(f"ostrom: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        help="data directory (default: $OSTROM_HOME, else the user data dir)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print one JSON document (JSON lines for streams)",
    )

    parser = argparse.ArgumentParser(
        prog="ostrom",
        parents=[common],
        description="Host, contribute to, validate and fork commons projects.",
    )
    parser.add_argument("--version", action="version", version=f"ostrom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, fn: Callable[..., Any], help_text: str, parent: Any = sub, add_help: bool = True
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name, parents=[common], help=help_text, description=help_text, add_help=add_help
        )
        p.set_defaults(func=fn)
        return p

    command("init", cmd_init, "create the data directory and this node's identity")
    command("id", cmd_id, "print this node's peer id and public key")
    p = command(
        "daemon",
        cmd_daemon,
        "run the node in the foreground (`ostrom daemon --help` lists its flags)",
        add_help=False,
    )
    p = command("peers", cmd_peers, "list connected peers and the projects you share")
    p = command("connect", cmd_connect, "dial a peer (a multiaddr ending in /p2p/<peer id>)")
    p.add_argument("addr", metavar="MULTIADDR")
    command("status", cmd_status, "show the running daemon's state")
    p = command(
        "limits", cmd_limits, "show the node's limits and use; change them until it restarts"
    )
    p.add_argument("--upload-rate", metavar="RATE", help="e.g. 256KiB/s; 0: no limit")
    p.add_argument("--download-rate", metavar="RATE", help="e.g. 1MiB/s; 0: no limit")
    p.add_argument("--storage", metavar="SIZE", help="e.g. 8GiB; 0: no limit")
    p.add_argument("--project-storage", metavar="SIZE", help="e.g. 2GiB; 0: no limit")
    p.add_argument("--max-peers", type=int, metavar="N")

    project = sub.add_parser("project", help="create, list and show projects")
    psub = project.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = command("create", cmd_project_create, "create a project", psub)
    p.add_argument("name")
    p.add_argument("--license", required=True, help="an SPDX license expression, e.g. MIT")
    p.add_argument("--description")
    p.add_argument("--quorum", type=int, default=1, help="acceptances a contribution needs")
    p.add_argument(
        "--maintainer",
        action="append",
        metavar="KEY",
        help="another initial maintainer (peer id or hex key); repeatable",
    )
    p.add_argument(
        "--mesh", help="a private mesh you are in: only its members are served the project"
    )
    command("list", cmd_project_list, "list the projects this node hosts", psub)
    p = command("show", cmd_project_show, "show a project", psub)
    p.add_argument("project", help="name, CID or CID prefix")

    p = command("contribute", cmd_contribute, "contribute files and directories to a project")
    p.add_argument("project")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--to", metavar="DIR", help="directory inside the project to put PATHs in")
    p.add_argument("--delete", action="append", metavar="PATH", help="remove a path; repeatable")
    p.add_argument("-m", "--message", required=True)
    p.add_argument("--resolves", action="append", metavar="NEED", help="a need this resolves")
    p.add_argument(
        "--parent",
        action="append",
        metavar="RECORD",
        help="build on this record instead of the accepted heads; repeatable",
    )

    p = command("log", cmd_log, "show a project's contributions, their status and validations")
    p.add_argument("project")
    p.add_argument("--limit", type=int, default=1000)

    p = command("validate", cmd_validate, "accept or reject a contribution or governance record")
    p.add_argument("record")
    verdict = p.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--accept", action="store_true")
    verdict.add_argument("--reject", action="store_true")
    p.add_argument("--note")

    p = command("tree", cmd_tree, "list the files of a project (its accepted tree by default)")
    p.add_argument("project")
    p.add_argument("--at", metavar="RECORD", help="the tree as of this record instead")

    p = command("checkout", cmd_checkout, "write a project's files into a directory")
    p.add_argument("project")
    p.add_argument("dir")
    p.add_argument("--at", metavar="RECORD")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty directory (overwrites, never deletes)",
    )

    p = command("fork", cmd_fork, "fork a project")
    p.add_argument("project")
    p.add_argument("--name", required=True)
    p.add_argument(
        "--at",
        action="append",
        metavar="RECORD",
        help="fork at this record (default: the accepted heads); repeatable",
    )
    p = command("follow", cmd_follow, "host a project (full CID if this node has never seen it)")
    p.add_argument("project")
    p.add_argument(
        "--records-only",
        action="store_true",
        help="keep records; fetch file blocks only when they are needed",
    )
    p = command("unfollow", cmd_unfollow, "stop hosting a project's new work")
    p.add_argument("project")
    p = command("forks", cmd_forks, "show a project's lineage and its forks")
    p.add_argument("project")

    p = command(
        "governance",
        cmd_governance,
        "propose a policy change: add-maintainer KEY, remove-maintainer KEY, set-quorum N",
    )
    p.add_argument("project")
    p.add_argument("action", choices=["add-maintainer", "remove-maintainer", "set-quorum"])
    p.add_argument("value", metavar="KEY|N")
    p.add_argument("--note")

    need = sub.add_parser("need", help="create and list needs (tasks a project asks for)")
    nsub = need.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = command("create", cmd_need_create, "create a need", nsub)
    p.add_argument("project")
    p.add_argument("title")
    p.add_argument("--body")
    p = command("list", cmd_need_list, "list a project's needs", nsub)
    p.add_argument("project")

    mesh = sub.add_parser(
        "mesh", help="community meshes: create, invite, join, admit, revoke, find projects"
    )
    msub = mesh.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = command("create", cmd_mesh_create, "create a mesh, with this node as steward", msub)
    p.add_argument("name")
    p.add_argument("--private", action="store_true", help="only admitted members take part")
    p.add_argument("--description")
    p.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="an address joining nodes dial (repeatable; default: this node's addresses)",
    )
    p.add_argument(
        "--steward", action="append", metavar="KEY", help="another steward (peer id or hex key)"
    )
    p = command("invite", cmd_mesh_invite, "print an invite string for a mesh", msub)
    p.add_argument("mesh", help="name, CID or CID prefix")
    p = command("join", cmd_mesh_join, "join the mesh an invite describes", msub)
    p.add_argument("invite")
    command("list", cmd_mesh_list, "list the meshes this node is in", msub)
    p = command("show", cmd_mesh_show, "show a mesh: stewards, members, bootstrap, projects", msub)
    p.add_argument("mesh")
    p = command(
        "projects",
        cmd_mesh_projects,
        "list the projects the mesh's members host (follow one with `ostrom follow CID`)",
        msub,
    )
    p.add_argument("mesh")
    p.add_argument("--limit", type=int, help="list at most this many (most hosted first)")
    p = command("leave", cmd_mesh_leave, "leave a mesh", msub)
    p.add_argument("mesh")
    for name, verb in (("admit", "admit a peer to"), ("revoke", "revoke a member of")):
        p = command(name, cmd_mesh_admit, f"(steward) {verb} a private mesh", msub)
        p.add_argument("mesh")
        p.add_argument("peer", metavar="PEER-ID")
        p.add_argument("--note")
        p.set_defaults(command_name=name)

    p = command("comment", cmd_comment, "comment on a record")
    p.add_argument("record")
    p.add_argument("text")
    p = command("show", cmd_show, "show one record with its validations and comments")
    p.add_argument("record")

    p = command("export", cmd_export, "write a project's records and blocks to a CARv1 file")
    p.add_argument("project")
    p.add_argument("file")
    p = command("import", cmd_import, "verify and take in the records and blocks of a CAR file")
    p.add_argument("file")
    p = command("events", cmd_events, "stream the node's events until interrupted")
    p.add_argument(
        "--type",
        action="append",
        dest="types",
        metavar="TYPE",
        help="only events of this type (repeatable), e.g. record.added; default: every event",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "func", None) is cmd_daemon:
        args.extra = extra
    elif extra:
        parser.parse_args(argv)  # reports the unrecognised arguments and exits
    if getattr(args, "command", None) == "contribute" and not args.paths and not args.delete:
        _usage("contribute needs at least one PATH or --delete PATH")
    out = Output(getattr(args, "json", False))
    try:
        data_dir = resolve_data_dir(getattr(args, "data_dir", None))
        args.func(args, out, data_dir)
    except DaemonNotRunning as exc:
        _report(out, exc)
        return EXIT_NO_DAEMON
    except OstromError as exc:
        _report(out, exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a local file: unreadable, disk full, permission denied
        print(f"ostrom: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
    return 0


def _report(out: Output, exc: OstromError) -> None:
    if out.json:
        json.dump({"error": {"code": exc.code, "message": exc.message}}, sys.stderr)
        sys.stderr.write("\n")
    else:
        print(f"ostrom: {exc.message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
