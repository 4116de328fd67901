"""free_port hands out loopback ports that outgoing connections cannot take in the meantime."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_serve.server import (HTTP_ADDRESS, Addresses, address_setting, check_distinct_ports,
                               ephemeral_ports, free_port, port_candidates)

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


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


def test_address_settings_take_what_torchserve_binds_and_name_what_it_would_not():
    taken = Addresses.from_env({"TS_INFERENCE_ADDRESS": "HTTPS://0.0.0.0:8443",
                                "TS_MANAGEMENT_ADDRESS": "http://localhost:9081",
                                "TS_METRICS_ADDRESS": "", "TS_GRPC_INFERENCE_PORT": "7070"})
    assert taken == Addresses("HTTPS://0.0.0.0:8443", "http://localhost:9081",
                              "http://127.0.0.1:8082", 7070, None)
    # TorchServe 0.12 refuses the last three ("Invalid binding address", after its start).
    for name, value in (("TS_METRICS_ADDRESS", "http://127.0.0.1:0"),
                        ("TS_MANAGEMENT_ADDRESS", "grpc://127.0.0.1:81"),
                        ("TS_INFERENCE_ADDRESS", "http://127.0.0.1:8080/predictions"),
                        ("TS_INFERENCE_ADDRESS", "http://127.0.0.1:8080/"),
                        ("TS_MANAGEMENT_ADDRESS", "http://[::1]:8081")):
        with pytest.raises(ValueError, match=f"^{name} must be http://HOST:PORT or https://"):
            Addresses.from_env({name: value})
    with pytest.raises(ValueError, match="^TS_GRPC_MANAGEMENT_PORT must be a port number"):
        Addresses.from_env({"TS_GRPC_MANAGEMENT_PORT": "70x"})
    # The job API's uvicorn takes an IPv6 literal, and plain HTTP only.
    assert address_setting({"A": "http://[::1]:8090/"}, "A", "", HTTP_ADDRESS) == \
        "http://[::1]:8090/"
    with pytest.raises(ValueError, match=r"^A must be http://HOST:PORT, the port"):
        address_setting({"A": "https://127.0.0.1:8090"}, "A", "", HTTP_ADDRESS)


def test_two_settings_of_one_start_on_one_port_are_refused_where_they_could_meet():
    settings = [("A", "127.0.0.1", 8080), ("B", "10.1.2.3", 8080), ("C", "127.0.0.1", 8081)]
    check_distinct_ports(settings)  # two addresses of their own: both can listen
    for host in ("127.0.0.1", "0.0.0.0", "::"):
        with pytest.raises(ValueError, match="^A and D share port 8080: give each its own$"):
            check_distinct_ports([*settings, ("D", host, 8080)])


@pytest.mark.parametrize("command", ["start", "live", "ready", "drain"])
def test_the_pods_commands_refuse_an_address_without_a_port_in_one_line(command, tmp_path):
    # TorchServe would bind such an address to port 80 (inference, metrics) or 8081
    # (management); the pod's probes and drain need the port, so the pod asks for it.
    env = {**os.environ, "TS_INFERENCE_ADDRESS": "http://0.0.0.0", "SDXL_RUN_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "sdxl_serve.pod", command], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert done.stderr == ("error: TS_INFERENCE_ADDRESS must be http://HOST:PORT or "
                           "https://HOST:PORT (no path; TorchServe takes no IPv6 literal), the "
                           "port from 1 to 65535, got 'http://0.0.0.0'\n"), done.stderr
    assert not list(tmp_path.iterdir())  # `start` made nothing: no run directory's files


@pytest.mark.parametrize("argv", [
    ["-m", "sdxl_serve.pod", "live", "--url", "127.0.0.1:8080"],
    ["-m", "sdxl_serve.pod", "ready", "--management", "localhost:8081"],
    [str(REPO / "scripts" / "health_probe.py"), "--url", "127.0.0.1:8080"],
])
def test_a_probes_address_option_is_checked_as_its_variable_is(argv, tmp_path):
    # `health_probe.py --url 127.0.0.1:8080` said "no answer from 127.0.0.1:8080: <urlopen
    # error unknown url type: 127.0.0.1>", where TS_INFERENCE_ADDRESS=127.0.0.1:8080 named
    # the rule.
    flag, value = argv[-2:]
    done = subprocess.run([sys.executable, *argv, "--run-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert done.stderr == (f"error: {flag} must be http://HOST:PORT or https://HOST:PORT (no "
                           "path; TorchServe takes no IPv6 literal), the port from 1 to 65535, "
                           f"got {value!r}\n"), done.stderr
