"""The Fleet gateway (`nfed flower-gateway`): the one door of a Flower SuperLink that SuperNodes reach.

flwr 1.42 serves the SuperLink's Fleet API (SuperNodes), Control API (`flwr run`, `flwr supernode register`) and
runtime API (its ServerApp processes) on one HTTPS port (`--host`/`--port`), and the open-source release's
Control API authenticates nobody (account login is Flower Enterprise's). Whoever reaches that port and holds the
public ca.crt registers SuperNode keys and starts runs, i.e. runs code on the SuperLink and on every SuperNode.
So the SuperLink listens on loopback (or an admin network) and this gateway, on the address the SuperNodes reach,
relays only Fleet API requests (POST to one of FLEET_PATHS) to it; every other request is answered 403 and logged.

The gateway terminates TLS with the SuperLink's own certificate and checks the SuperLink's with ca.crt; it
relays bodies in blocks (a model chunk is 5 MB) and requires a Content-Length (no chunked request bodies, so
no request can be framed differently by the gateway and the SuperLink). SuperNode authentication (signed
headers) passes through unchanged: the SuperLink still decides which node is admitted.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import sys
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer
from typing import Callable

from nfed.common.errors import ConfigError

# The Fleet API routes of flwr 1.42's SuperLink (flwr/superlink/routers/fleet/router.py); a test compares them.
FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat", "pull-messages",
    "push-messages", "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received"))
# Headers about one connection, or re-framed here: never relayed as they came.
NOT_RELAYED = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                         "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect"})
BLOCK = 1 << 20
DRAIN_BYTES = 1 << 20   # what a refused client still sends is read (and dropped) up to this size


@dataclass(frozen=True)
class Endpoint:
    """A TCP endpoint, host (name, IPv4 or IPv6 without brackets) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str, option: str) -> Endpoint:
    """HOST:PORT (IPv6 as [::1]:PORT) as an Endpoint; ConfigError naming `option` otherwise."""
    host, colon, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536 or "[" in host or "]" in host:
        raise ConfigError(f"{option} must be HOST:PORT (e.g. 127.0.0.1:9091, [::1]:9091), not {text!r}")
    return Endpoint(host, int(port))


def _context(load: Callable[[ssl.SSLContext], None], purpose: ssl.Purpose, what: str) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        load(context)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load {what}: {exc.strerror or exc}") from None
    return context


class FleetGateway:
    """Listens with TLS on `listen` and relays the Fleet API, alone, to the SuperLink at `superlink`."""

    def __init__(self, listen: Endpoint, superlink: Endpoint, *, certfile: Path, keyfile: Path, ca_certfile: Path,
                 max_request_bytes: int = 1 << 30, timeout: float = 300.0,
                 log: Callable[[str], None] | None = None):
        if listen == superlink:
            raise ConfigError(f"the gateway cannot listen on the SuperLink's own address {listen}")
        self.superlink = superlink
        self.max_request_bytes = max_request_bytes
        self.timeout = timeout
        self.log = log if log is not None else (lambda line: print(line, file=sys.stderr, flush=True))
        self.server_context = _context(lambda c: c.load_cert_chain(str(certfile), str(keyfile)),
                                       ssl.Purpose.CLIENT_AUTH, f"the certificate {certfile} with key {keyfile}")
        self.client_context = _context(lambda c: c.load_verify_locations(cafile=str(ca_certfile)),
                                       ssl.Purpose.SERVER_AUTH, f"the CA certificate {ca_certfile}")
        try:
            self.server = _GatewayServer(listen, self)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from None

    @property
    def address(self) -> Endpoint:
        """Where the gateway listens (the real port when `listen` asked for port 0)."""
        host, port = self.server.server_address[:2]
        return Endpoint(host, port)

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.5)

    def close(self) -> None:
        """Stop serving (from another thread) and release the port."""
        self.server.shutdown()
        self.server.server_close()

    def connect(self) -> http.client.HTTPSConnection:
        """A new connection to the SuperLink, its certificate checked against ca.crt and its address."""
        return http.client.HTTPSConnection(self.superlink.host, self.superlink.port, context=self.client_context,
                                           timeout=self.timeout)


class _GatewayServer(ThreadingHTTPServer):
    """One thread per connection; the TLS handshake happens in that thread, not in the accepting one."""

    daemon_threads = True

    def __init__(self, listen: Endpoint, gateway: FleetGateway):
        self.gateway = gateway
        self.address_family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        super().__init__((listen.host, listen.port), _FleetRelay)

    def server_bind(self) -> None:
        TCPServer.server_bind(self)   # HTTPServer's would look the host's name up in DNS, for nothing
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def finish_request(self, request, client_address) -> None:
        request.settimeout(self.gateway.timeout)
        try:
            connection = self.gateway.server_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return   # a failed handshake (a scanner, a client without ca.crt): nothing was asked
        with connection:
            _FleetRelay(connection, client_address, self)

    def handle_error(self, request, client_address) -> None:
        self.gateway.log(f"nfed flower-gateway: connection from {client_address[0]} failed: {sys.exc_info()[1]!r}")


class _FleetRelay(BaseHTTPRequestHandler):
    """Relays POST requests to a Fleet API path; refuses everything else."""

    protocol_version = "HTTP/1.1"
    server_version = "nfed-flower-gateway"
    sys_version = ""

    def do_POST(self) -> None:
        gateway: FleetGateway = self.server.gateway
        if self.path not in FLEET_PATHS:
            return self._refuse(403, "only the Fleet API is served here")
        lengths = self.headers.get_all("Content-Length") or []
        if "Transfer-Encoding" in self.headers or len(lengths) != 1:
            return self._refuse(411, "one Content-Length is required")
        if not (lengths[0].isascii() and lengths[0].isdigit()):
            return self._refuse(400, "bad Content-Length")
        length = int(lengths[0])
        if length > gateway.max_request_bytes:
            return self._refuse(413, f"request larger than {gateway.max_request_bytes} bytes")
        upstream = gateway.connect()
        try:
            try:
                upstream.putrequest("POST", self.path, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in NOT_RELAYED:
                        upstream.putheader(name, value)
                upstream.putheader("Content-Length", str(length))
                upstream.endheaders()
                remaining = length
                while remaining:
                    block = self.rfile.read(min(BLOCK, remaining))
                    if not block:
                        self.close_connection = True
                        return   # the client went away mid-request
                    upstream.send(block)
                    remaining -= len(block)
                response = upstream.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                return self._refuse(502, "the SuperLink did not answer", why=repr(exc))
            self._relay_response(response)
        finally:
            upstream.close()

    def _relay_response(self, response: http.client.HTTPResponse) -> None:
        body = response.read() if response.length is None else None   # chunked: re-framed with a length
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in NOT_RELAYED:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if body is not None else response.length))
        self.end_headers()
        if body is not None:
            self.wfile.write(body)
            return
        while block := response.read(BLOCK):
            self.wfile.write(block)
        if response.length:   # the SuperLink sent less than it announced: this connection is out of step
            self.close_connection = True

    def _refuse(self, status: int, message: str, why: str = "") -> None:
        """Answer `status` with a one-line reason, log it, and close the connection."""
        self.server.gateway.log(f"nfed flower-gateway: {status} for {self.command} {self.path[:200]!r} from "
                                f"{self.client_address[0]}" + (f": {why}" if why else ""))
        body = f"{message}\n".encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True
        self._linger()

    def _linger(self) -> None:
        """Read and drop what the client still sends (up to DRAIN_BYTES, for a second at most) before closing:
        closing a socket with unread data resets the connection, and the client could lose the answer."""
        try:
            self.connection.settimeout(1.0)
            left = DRAIN_BYTES
            while left > 0 and (block := self.rfile.read1(min(left, 1 << 16))):
                left -= len(block)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._refuse(403, "only the Fleet API is served here")

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def log_message(self, format, *args) -> None:
        """Quiet: refusals are logged by _refuse; a heartbeat every few seconds per node is not news."""
