"""`nfed flower-gateway`: relays the Flower Fleet API, and nothing else, to a SuperLink over TLS.

A stand-in SuperLink (an HTTPS server on 127.0.0.1 that records what reaches it) replaces flwr here; the real
deployment is tests/test_flower_deployment_security.py's.
"""
from __future__ import annotations

import hashlib
import http.client
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("cryptography")

from flower_harness import LOOPBACK, free_port, make_tls_files  # noqa: E402
from nfed.federation.flower.gateway import FLEET_PATHS, Endpoint, FleetGateway, parse_endpoint  # noqa: E402


class _SuperLink(BaseHTTPRequestHandler):
    """Answers every POST with the sha256 of its body; records (path, headers, body)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append((self.path, self.headers, body))
        answer = hashlib.sha256(body).hexdigest().encode() * 40_000   # 2.5 MB: more than one relayed block
        self.send_response(201)
        self.send_header("Content-Type", "application/protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format, *args):
        pass


def _serve(server) -> None:
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def _stand_in_superlink(tls) -> ThreadingHTTPServer:
    """A _SuperLink serving HTTPS on a free loopback port with `tls`'s server certificate; `.seen` its requests."""
    server = ThreadingHTTPServer((LOOPBACK, 0), _SuperLink)
    server.seen = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    _serve(server)
    return server


@pytest.fixture()
def deployment(tmp_path):
    """(gateway, stand-in SuperLink, TLS files, refusal log): the SuperLink's certificate is signed by the CA
    the gateway trusts."""
    tls = make_tls_files(tmp_path / "tls")
    superlink = _stand_in_superlink(tls)
    log: list[str] = []
    gateway = FleetGateway(Endpoint(LOOPBACK, 0),
                           parse_endpoint(f"{LOOPBACK}:{superlink.server_address[1]}", "--superlink"),
                           certfile=tls.server_cert, keyfile=tls.server_key, ca_certfile=tls.ca_cert,
                           max_request_bytes=8 << 20, timeout=10, log=log.append)
    _serve(gateway.server)
    yield gateway, superlink, tls, log
    gateway.close()
    superlink.shutdown()
    superlink.server_close()


def _connect(gateway: FleetGateway, ca_cert: Path) -> http.client.HTTPSConnection:
    """A SuperNode's view: TLS to the gateway, checked against ca.crt."""
    return http.client.HTTPSConnection(LOOPBACK, gateway.address.port, timeout=10,
                                       context=ssl.create_default_context(cafile=str(ca_cert)))


def _post(connection, path: str, body: bytes = b"", headers: dict | None = None, method: str = "POST"):
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.getheaders(), response.read()


def test_fleet_requests_and_answers_are_relayed_unchanged_on_one_connection(deployment):
    gateway, superlink, tls, log = deployment
    body = bytes(range(256)) * 12_000   # 3 MB: relayed in blocks
    signed = {"Content-Type": "application/protobuf", "flwr-public-key": "a2V5", "flwr-signature": "c2ln",
              "flwr-timestamp": "2026-01-01T00:00:00+00:00"}
    connection = _connect(gateway, tls.ca_cert)
    for path in ("/v1/fleet/push-object", "/v1/fleet/pull-messages"):   # the second reuses the connection
        status, headers, answer = _post(connection, path, body, signed)
        assert status == 201
        assert answer == hashlib.sha256(body).hexdigest().encode() * 40_000
        assert dict(headers)["Content-Type"] == "application/protobuf"
    connection.close()
    assert [path for path, _, _ in superlink.seen] == ["/v1/fleet/push-object", "/v1/fleet/pull-messages"]
    path, headers, received = superlink.seen[0]
    assert received == body
    assert {name: headers[name] for name in signed} == signed   # SuperNode authentication passes through
    assert headers["Host"] == f"{LOOPBACK}:{superlink.server_address[1]}"
    assert log == []


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/control/register-node"), ("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/acquire-task"),
    ("POST", "/v1/fleet/../control/start-run"), ("POST", "/v1/fleet/pull-messages?x=1"),
    ("POST", "/v1/fleet/pull-messages/"), ("POST", "https://example.org/v1/fleet/pull-messages"),
    ("GET", "/v1/fleet/pull-messages"), ("PUT", "/v1/fleet/push-object"), ("GET", "/docs")])
def test_everything_but_a_fleet_api_post_is_refused_without_reaching_the_superlink(deployment, method, path):
    gateway, superlink, tls, log = deployment
    status, headers, answer = _post(_connect(gateway, tls.ca_cert), path, b"x", method=method)
    assert status == 403 and answer == b"only the Fleet API is served here\n"
    assert dict(headers)["Connection"] == "close"
    assert superlink.seen == []
    assert len(log) == 1 and log[0].startswith(f"nfed flower-gateway: 403 for {method} ") and LOOPBACK in log[0]


def test_chunked_and_oversized_requests_are_refused(deployment):
    gateway, superlink, tls, log = deployment
    connection = _connect(gateway, tls.ca_cert)
    connection.putrequest("POST", "/v1/fleet/push-object")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    connection.send(b"1\r\nx\r\n0\r\n\r\n")
    assert connection.getresponse().status == 411
    connection = _connect(gateway, tls.ca_cert)
    connection.putrequest("POST", "/v1/fleet/push-object")
    connection.putheader("Content-Length", str((8 << 20) + 1))
    connection.endheaders()
    connection.send(b"x" * 1000)   # refused before the body is read
    response = connection.getresponse()
    assert response.status == 413 and b"larger than" in response.read()
    assert superlink.seen == []


def test_a_superlink_down_or_not_certified_by_the_ca_gets_no_request(deployment, tmp_path):
    gateway, superlink, tls, log = deployment
    impostor = _stand_in_superlink(make_tls_files(tmp_path / "impostor"))   # certified for 127.0.0.1 by another CA
    try:
        for port in (impostor.server_address[1], free_port()):
            gateway.superlink = parse_endpoint(f"{LOOPBACK}:{port}", "--superlink")
            status, _, answer = _post(_connect(gateway, tls.ca_cert), "/v1/fleet/pull-messages", b"x")
            assert status == 502 and answer == b"the SuperLink did not answer\n"
    finally:
        impostor.shutdown()
        impostor.server_close()
    assert impostor.seen == [] and superlink.seen == []
    assert "CERTIFICATE_VERIFY_FAILED" in log[0] and "Connection refused" in log[1], log


def test_the_relayed_paths_are_flwr_fleet_routes():
    pytest.importorskip("flwr")
    from flwr.superlink.routers.fleet.router import router

    assert FLEET_PATHS == {route.path for route in router.routes}


@pytest.mark.parametrize("text", ["9091", "host:", ":9091", "host:0", "host:65536", "host:x", "[::1:9091", "a b:1:"])
def test_addresses_are_host_colon_port(text):
    from nfed.common.errors import ConfigError

    with pytest.raises(ConfigError, match="--listen must be HOST:PORT"):
        parse_endpoint(text, "--listen")


def test_addresses_parse():
    assert str(parse_endpoint("[::1]:9092", "--listen")) == "[::1]:9092"
    assert parse_endpoint("fl.example.org:9092", "--listen").host == "fl.example.org"


def test_the_command_reports_unusable_options_in_one_line(tmp_path):
    from nfed.cli import cli

    tls = make_tls_files(tmp_path / "tls")
    files = ["--ssl-certfile", str(tls.server_cert), "--ssl-keyfile", str(tls.server_key),
             "--root-certificates", str(tls.ca_cert)]
    cases = {("--listen", "0.0.0.0"): "--listen must be HOST:PORT",
             ("--listen", f"{LOOPBACK}:{free_port()}", "--ssl-keyfile", str(tls.ca_cert)):
                 "cannot load the certificate",
             ("--listen", f"{LOOPBACK}:{free_port()}", "--root-certificates", str(tmp_path / "none.crt")):
                 "cannot load the CA certificate",
             ("--listen", "203.0.113.9:9092"): "cannot listen on 203.0.113.9:9092"}
    for args, message in cases.items():
        result = CliRunner().invoke(cli, ["flower-gateway", *files, *args])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
