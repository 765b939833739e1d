"""rlcore.cluster: finding the network interface that holds an address (gloo's GLOO_SOCKET_IFNAME),
and a cluster.address where nothing answers."""

import shutil
import socket
import subprocess
import time

import pytest

from rlcore.cluster import check_answers, interface_holding
from rlcore.config import ConfigError


def ip_addresses() -> dict[str, str]:
    """IPv4 address → interface, as `ip -o -4 addr` lists them."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to compare with")
    lines = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout.splitlines()
    return {fields[3].split("/")[0]: fields[1] for fields in (line.split() for line in lines)}


def test_every_address_of_this_machine_maps_to_its_interface():
    addresses = ip_addresses()
    assert "127.0.0.1" in addresses
    for address, interface in addresses.items():
        assert interface_holding(address) == interface, address


def test_an_address_of_no_interface_gives_none():
    assert interface_holding("192.0.2.1") is None  # TEST-NET-1, documentation only


def test_a_refused_address_is_a_config_error_at_once():
    """ray.init would retry a refused connection for minutes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free again once closed: nothing listens there
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^cluster.address=127.0.0.1:{port}: nothing answers there \(Connection refused\); start"):
        check_answers(f"127.0.0.1:{port}", "start one")
    assert time.monotonic() - started < 5


def test_a_listening_address_and_other_forms_pass():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        check_answers(f"127.0.0.1:{port}", "start one")
        check_answers(f"ray://127.0.0.1:{port}", "start one")  # Ray Client's form
    check_answers("auto", "start one")  # Ray finds the cluster itself
