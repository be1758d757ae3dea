"""cluster/connect.py's probe: a given address that does not answer is one error naming it, within the timeout.

The whole rule (own instance beside a foreign one, listeners on loopback, a dead cluster through the CLI):
tests/e2e/test_own_cluster.py."""

from __future__ import annotations

import time

import pytest

from cluster.connect import ClusterConnectError, probe
from tests.conftest import free_port


def test_a_silent_address_fails_within_its_timeout_naming_it_and_what_to_do():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ClusterConnectError) as err:
        probe(f"127.0.0.1:{port}", 1.0)
    assert 1.0 <= time.monotonic() - t0 < 5.0
    assert f"no Ray answers at 127.0.0.1:{port}" in str(err.value)
    assert "prm-factory cluster up" in str(err.value) and "cluster.address" in str(err.value)


def test_an_address_that_answers_is_returned_as_host_port():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert probe(f"127.0.0.1:{port}", 1.0) == f"127.0.0.1:{port}"
        assert probe(f"ray://127.0.0.1:{port}", 1.0) == f"127.0.0.1:{port}"


@pytest.mark.parametrize("address", ["127.0.0.1", "nowhere:port", "ray://"])
def test_a_malformed_address_is_refused_at_once(address):
    with pytest.raises(ClusterConnectError, match="is not host:port"):
        probe(address, 5.0)
