"""The artifact benchmark's hosts (`bench.hosts`): namespaces, links, shaping and clean-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.hosts import Hosts

# A TCP server on a host: it answers one connection with what it read, upper-cased.
_ECHO_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], 7700))
print("ready", flush=True)
conn, _ = server.accept()
conn.sendall(conn.recv(100).upper())
conn.close()
"""
# A TCP client on a host: prints what the server answered, or the error.
_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 7700), timeout=3) as conn:
        conn.sendall(b"commons")
        print(conn.recv(100).decode())
except OSError as exc:
    print(type(exc).__name__)
"""


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def run_on(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def test_holders_reach_the_fetcher_over_their_own_shaped_links_only() -> None:
    with Hosts(2, 50) as hosts:
        made = {hosts.fetcher.namespace, *(h.namespace for h in hosts.holders)}
        assert made <= namespaces()
        first = hosts.holders[0]
        with subprocess.Popen(
            first.command([sys.executable, "-c", _ECHO_SERVER, first.address]),
            stdout=subprocess.PIPE,
            text=True,
        ) as server:
            try:
                assert server.stdout is not None
                assert server.stdout.readline().strip() == "ready"
                # Another holder has no route to it: holders meet only through the fetcher.
                other = hosts.holders[1].command([sys.executable, "-c", _CLIENT, first.address])
                assert run_on(other) != "COMMONS"
                fetcher = hosts.fetcher.command([sys.executable, "-c", _CLIENT, first.address])
                assert run_on(fetcher) == "COMMONS"
            finally:
                server.kill()
        shaping = run_on(["tc", "-n", first.namespace, "qdisc", "show"])
        assert "tbf" in shaping and "rate 50Mbit" in shaping
        # The fetcher's way back is not shaped.
        assert "tbf" not in run_on(["tc", "-n", hosts.fetcher.namespace, "qdisc", "show"])
    assert not made & namespaces()


def test_a_failed_setup_leaves_nothing_behind() -> None:
    hosts = Hosts(1, 10)
    # A namespace of that name already there makes the setup fail part way.
    subprocess.run(["ip", "netns", "add", hosts.holders[0].namespace], check=True, timeout=30)
    try:
        with pytest.raises(RuntimeError, match="netns add"), hosts:
            pass
        assert hosts.fetcher.namespace not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", hosts.holders[0].namespace], timeout=30)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="holders"):
        Hosts(0, 100)
    with pytest.raises(ValueError, match="mbit"):
        Hosts(1, -1)
