"""Rendezvous address and interface selection (loopback only here; the cross-node case, with
its own interface per network namespace, runs in tests/cluster/test_slurm_train.py)."""
from __future__ import annotations

import pytest

from megatron_rpp.parallel import network


def test_loopback_routes_over_lo():
    assert network.ip_toward("127.0.0.1") == "127.0.0.1"
    assert network.interface_toward("127.0.0.1") == "lo"
    assert network.interface_addresses()["lo"] == "127.0.0.1"


@pytest.fixture
def no_dns(monkeypatch):
    """A resolver that knows no name (no DNS query may leave this machine)."""
    import socket

    real = socket.gethostbyname

    def numeric_only(host):
        try:
            socket.inet_aton(host)
        except OSError:
            raise socket.gaierror(-2, "Name or service not known") from None
        return real(host)

    monkeypatch.setattr(network.socket, "gethostbyname", numeric_only)


def test_unknown_host_is_a_clear_error(no_dns):
    with pytest.raises(OSError, match="cannot resolve 'no-such-host.invalid'"):
        network.ip_toward("no-such-host.invalid")


def test_rendezvous_env_detected_and_overridable(monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", *network.IFNAME_VARS):
        monkeypatch.delenv(var, raising=False)
    got = network.configure_rendezvous(29555)
    assert got == {"master": "127.0.0.1:29555", "detected_iface": "lo", "gloo_socket_ifname": "lo",
                   "nccl_socket_ifname": "lo"}
    import os

    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"] == "29555"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")  # the user's choice wins
    monkeypatch.delenv("NCCL_SOCKET_IFNAME")
    got = network.configure_rendezvous(29556)
    assert got["gloo_socket_ifname"] == "ib0" and got["nccl_socket_ifname"] == "lo"


def test_free_port_on_binds_that_address():
    import socket

    port = network.free_port_on("127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # still free right after


def test_cli(capsys, no_dns):
    assert network.main(["iface-toward", "127.0.0.1"]) == 0
    assert capsys.readouterr().out.strip() == "lo"
    assert network.main(["ip-toward", "no-such-host.invalid"]) == 1
    assert "cannot resolve" in capsys.readouterr().err
    assert network.main(["bogus"]) == 2
