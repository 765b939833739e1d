"""rlcore.cluster: finding the network interface that holds an address (gloo's GLOO_SOCKET_IFNAME)."""

import shutil
import subprocess

import pytest

from rlcore.cluster import interface_holding


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
