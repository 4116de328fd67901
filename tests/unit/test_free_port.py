"""free_port hands out loopback ports that outgoing connections cannot take in the meantime."""

from __future__ import annotations

import socket

import pytest

from sdxl_serve.server import ephemeral_ports, free_port, port_candidates

pytestmark = pytest.mark.unit


def test_ports_are_outside_the_ephemeral_range_distinct_and_bindable():
    low, high = ephemeral_ports()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert not [port for port in ports if low <= port <= high]
    for port in ports[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_listening_port_is_never_handed_out():
    # Fill a band of candidate ports by listening on them: none of them may come back.
    held = []
    for port in port_candidates():
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        held.append(sock)
        if len(held) == 500:
            break
    try:
        taken = {sock.getsockname()[1] for sock in held}
        assert not taken & {free_port() for _ in range(200)}
    finally:
        for sock in held:
            sock.close()
