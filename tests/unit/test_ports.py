"""Free loopback ports for side-by-side servers (imagerec/torchserve.py)."""

from __future__ import annotations

import socket

from imagerec.torchserve import TorchServe, free_ports


def test_free_ports_are_distinct_and_avoid_the_given_ones():
    avoid = set(free_ports(20))
    ports = free_ports(50, avoid=avoid)
    assert len(set(ports)) == 50 and not set(ports) & avoid
    for port in ports:  # released: each can be bound again
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_server_with_a_front_picks_six_distinct_ports(tmp_path):
    """The front, TorchServe's inference API behind it, management, metrics and both gRPC ports."""
    for _ in range(20):
        server = TorchServe(model_store=tmp_path / "store", workdir=tmp_path / "work", front=True)
        addresses = [server.inference_url, server.upstream_url, server.management_url, server.metrics_url,
                     server.properties["grpc_inference_port"], server.properties["grpc_management_port"]]
        ports = [int(str(address).rsplit(":", 1)[-1]) for address in addresses]
        assert len(set(ports)) == 6, ports


def test_given_ports_are_never_picked_again(tmp_path):
    given = tuple(free_ports(3))
    server = TorchServe(model_store=tmp_path / "store", workdir=tmp_path / "work", ports=given, front=True,
                        overrides={"grpc_inference_port": "7070", "grpc_management_port": "7071"})
    assert int(server.upstream_url.rsplit(":", 1)[1]) not in set(given) | {7070, 7071}
