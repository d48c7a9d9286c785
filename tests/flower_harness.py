"""A real Flower deployment on loopback for tests and benches: one SuperLink, N SuperNodes, `flwr run`.

Every process binds 127.0.0.1 on a free port, runs in its own process group and is stopped by PID when the
deployment closes (also on failure): the launched groups, and every descendant found in /proc (the SuperLink
starts its `flower-superexec` in a session of its own). Should the test process itself be killed, the
launched processes get SIGKILL from the kernel (parent-death signal); Flower's own helpers watch their
parent's PID and exit with it. FLWR_HOME is a private folder holding the `flwr`
connection config, so nothing outside the work folder is touched; telemetry is off.

    with FlowerDeployment(tmp_path, tls=make_tls_files(tmp_path / "tls")) as flower:
        flower.start_superlink()
        flower.start_supernodes({"Gangnam-gu": {"pack": "/data/Gangnam-gu.h5"}})
        result = flower.run_app(app_dir, timeout=120)

flwr 1.42 serves the SuperLink's Fleet, Control and ServerApp runtime APIs on one HTTP port (`--port`); a
SuperNode opens one more port of its own (`--port`) for its ClientApp runtime. With `gateway_host`, the README's
recipe: the SuperNodes reach the SuperLink through `nfed flower-gateway` (the Fleet API alone) on that address.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Mapping

LOOPBACK = "127.0.0.1"


def flwr_available() -> bool:
    """True when flwr and its command-line programs are installed beside this Python."""
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        return False
    return (Path(sys.executable).parent / "flower-superlink").exists()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` (127.0.0.1) that nothing listens on now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None, host: str = LOOPBACK) -> None:
    """Block until something accepts connections on host:port (RuntimeError on timeout or exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args[0]} exited with {process.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


# ------------------------------------------------------------------------------------------------- TLS

@dataclass
class TlsFiles:
    """PEM files of a private CA and a server certificate for 127.0.0.1 / localhost signed by it."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(directory: Path, *, days: int = 2, extra_ips: Collection[str] = ()) -> TlsFiles:
    """Generate a CA and a SuperLink server certificate (SAN 127.0.0.1, localhost and `extra_ips`) with
    `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nfed test CA")])
    ca_cert = (x509.CertificateBuilder()
               .subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(valid_from).not_valid_after(valid_to)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                   .issuer_name(ca_name)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(valid_from).not_valid_after(valid_to)
                   .add_extension(x509.SubjectAlternativeName([
                       x509.DNSName("localhost"),
                       *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in (LOOPBACK, *extra_ips))]),
                       critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))

    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def make_supernode_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair for SuperNode authentication, in OpenSSH format as `ssh-keygen -t ecdsa -b 384`
    writes it: (private key file, public key file)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


# ------------------------------------------------------------------------------------------ processes

def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (which may hold spaces), or None if PID is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time in clock ticks): tells a process apart from a later one that reuses its PID."""
    fields = _stat_fields(pid)
    return None if fields is None else (pid, fields[19])


def descendants(pid: int) -> list[tuple[int, str]]:
    """Identities of every live process below `pid` (children, grandchildren, ...), from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                tree.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            identity = _identity(child)
            if identity is not None:
                found.append(identity)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """True while any thread of the process runs: its main thread can be a zombie while others still exit,
    holding the process's files (and their locks) until the last one is gone."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    states = [_task_state(pid, thread) for thread in threads]
    return any(state is not None and state not in "ZX" for state in states)


def _task_state(pid: int, thread: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/task/{thread}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return None


def _signal_identity(identity: tuple[int, str], sig: int) -> None:
    """Signal the process only while it is still the one recorded (same PID and start time)."""
    if _identity(identity[0]) == identity:
        _signal_quietly(os.kill, identity[0], sig)


def _die_with_parent() -> None:
    """In the child before exec: its own process group, and SIGKILL when the launching process dies.

    Linux's PR_SET_PDEATHSIG covers what a `finally` cannot: the test process killed by SIGTERM/SIGKILL
    (a CI timeout) still takes its SuperLink and SuperNodes with it.
    """
    os.setsid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _signal_quietly(kill: Callable[[int, int], None], target: int, sig: int) -> None:
    try:
        kill(target, sig)
    except (ProcessLookupError, PermissionError):
        pass


def format_node_config(node_config: Mapping[str, object]) -> str:
    """`key="value" key2=3` as `flower-supernode --node-config` expects (strings quoted, TOML style)."""
    parts = []
    for key, value in node_config.items():
        if isinstance(value, str):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'{key}="{escaped}"')
        elif isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def write_flwr_config(flwr_home: Path, address: str, ca_cert: Path | None) -> None:
    """FLWR_HOME/config.toml naming one connection, `nfed-test`, to the SuperLink at `address` (TLS checked
    against `ca_cert`; None: insecure), as the README's operator writes it."""
    lines = ['[superlink]', 'default = "nfed-test"', '', '[superlink.nfed-test]', f'address = "{address}"']
    lines.append("insecure = true" if ca_cert is None else f'root-certificates = "{ca_cert}"')
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    (Path(flwr_home) / "config.toml").write_text("\n".join(lines) + "\n")


@dataclass
class RunResult:
    """What `flwr run ... --stream` printed and how it ended."""

    returncode: int
    output: str
    seconds: float


class FlowerDeployment:
    """SuperLink + SuperNodes + `flwr run` on loopback; a context manager that always stops them all."""

    def __init__(self, workdir: Path, *, tls: TlsFiles | None = None, python_path: list[Path] | None = None,
                 node_auth: bool = False, superlink_host: str = LOOPBACK, gateway_host: str | None = None):
        self.workdir = Path(workdir)
        self.superlink_host = superlink_host   # where the SuperLink listens (the operator's `flwr` connects there)
        self.gateway_host = gateway_host       # set: SuperNodes connect through `nfed flower-gateway` listening here
        if gateway_host is not None and tls is None:
            raise ValueError("nfed flower-gateway needs TLS")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.node_auth = node_auth   # SuperLink admits only SuperNodes whose public key is registered
        if node_auth and tls is None:
            raise ValueError("Flower's SuperNode authentication needs TLS")
        self.flwr_home = self.workdir / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)
        self.bin_dir = Path(sys.executable).parent
        self.env = dict(os.environ)
        self.env.update(FLWR_HOME=str(self.flwr_home), FLWR_TELEMETRY_ENABLED="0",
                        PATH=f"{self.bin_dir}{os.pathsep}{self.env.get('PATH', '')}",
                        PYTHONUNBUFFERED="1")
        if python_path:
            existing = self.env.get("PYTHONPATH")
            paths = [str(p) for p in python_path] + ([existing] if existing else [])
            self.env["PYTHONPATH"] = os.pathsep.join(paths)
        self.superlink_port: int | None = None
        self.fleet_address: str | None = None   # host:port the SuperNodes connect to
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[str, subprocess.Popen] = {}
        self._supernode_args: dict[str, tuple[list[str], int]] = {}   # name -> (command line, runtime port)
        self._runs = 0
        self._processes: list[subprocess.Popen] = []
        self._known_pids: set[tuple[int, str]] = set()

    # -- lifecycle
    def __enter__(self) -> "FlowerDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        try:
            process = subprocess.Popen([str(self.bin_dir / args[0]), *args[1:]], env=self.env,
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=_die_with_parent, cwd=self.workdir)
        finally:
            log.close()
        self._processes.append(process)
        return process

    def _security_args(self) -> list[str]:
        return ["--insecure"] if self.tls is None else []

    def start_superlink(self, timeout: float = 60.0) -> int:
        """Start the SuperLink on a free port of its host; returns that port once it accepts connections."""
        port = free_port(self.superlink_host)
        args = ["flower-superlink", *self._security_args(), "--host", self.superlink_host, "--port", str(port),
                "--disable-runtime-dependency-installation"]
        if self.tls is not None:
            args += ["--ssl-certfile", str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key),
                     "--ssl-ca-certfile", str(self.tls.ca_cert)]
        if self.node_auth:
            args.append("--enable-supernode-auth")
        self.superlink = self._start("superlink", args)
        wait_for_port(port, timeout, self.superlink, host=self.superlink_host)
        self.superlink_port = port
        self.fleet_address = f"{self.superlink_host}:{port}"
        self._write_connection_config()
        if self.gateway_host is not None:
            self._start_gateway(timeout)
        return port

    def _start_gateway(self, timeout: float) -> None:
        """`nfed flower-gateway` on a free port of `gateway_host`, relaying the Fleet API alone to the SuperLink;
        the SuperNodes connect to it."""
        port = free_port(self.gateway_host)
        gateway = self._start("gateway", [
            "nfed", "flower-gateway", "--listen", f"{self.gateway_host}:{port}",
            "--superlink", f"{self.superlink_host}:{self.superlink_port}", "--ssl-certfile", str(self.tls.server_cert),
            "--ssl-keyfile", str(self.tls.server_key), "--root-certificates", str(self.tls.ca_cert)])
        wait_for_port(port, timeout, gateway, host=self.gateway_host)
        self.fleet_address = f"{self.gateway_host}:{port}"

    def flwr(self, *args: str, flwr_home: Path | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run `flwr ARGS...` with this deployment's connection config, or with the one in `flwr_home` (e.g. an
        outsider's, who holds nothing but ca.crt); returns the finished process (text output)."""
        env = self.env if flwr_home is None else {**self.env, "FLWR_HOME": str(flwr_home)}
        return subprocess.run([str(self.bin_dir / "flwr"), *args], env=env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def register_supernode(self, public_key: Path, timeout: float = 60.0) -> None:
        """`flwr supernode register KEY.pub nfed-test`: admit the SuperNode holding the matching private key."""
        result = self.flwr("supernode", "register", str(public_key), "nfed-test", timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed ({result.returncode}): "
                               f"{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start_supernodes(self, node_configs: Mapping[str, Mapping[str, object]], timeout: float = 60.0,
                         keys: Mapping[str, Path] | None = None, refused: Collection[str] = ()) -> None:
        """Start one SuperNode per entry (name -> node config), all at once, each on its own runtime port;
        `keys` names the private key a node authenticates with (SuperNode authentication). Nodes named in
        `refused` are expected to be turned away by the SuperLink: they are not waited for (one may exit before
        it listens, depending on how fast the SuperLink answers)."""
        if self.superlink_port is None:
            raise RuntimeError("start the SuperLink first")
        started = []
        for name, node_config in node_configs.items():
            port = free_port()
            args = ["flower-supernode", *self._security_args(), "--superlink", self.fleet_address,
                    "--host", LOOPBACK, "--port", str(port),
                    "--node-config", format_node_config(node_config)]
            if self.tls is not None:
                args += ["--root-certificates", str(self.tls.ca_cert)]
            if keys and name in keys:
                args += ["--auth-supernode-private-key", str(keys[name])]
            self.supernodes[name] = process = self._start(f"supernode-{name}", args)
            self._supernode_args[name] = (args, port)
            if name not in refused:
                started.append((port, process))
        for port, process in started:
            wait_for_port(port, timeout, process)

    def kill_supernode(self, name: str) -> None:
        """Kill one SuperNode and everything it started (SIGKILL: a machine that drops off the network)."""
        process = self.supernodes.pop(name)
        self._stop(process, signal.SIGKILL)

    def restart_supernode(self, name: str, timeout: float = 60.0) -> None:
        """Stop a SuperNode as its service manager would (SIGTERM, then wait) and start it again with the same
        command line: it registers with the SuperLink afresh."""
        process = self.supernodes.pop(name)
        self._stop(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop(process, signal.SIGKILL)
            process.wait()
        args, port = self._supernode_args[name]
        self.supernodes[name] = restarted = self._start(f"supernode-{name}-restarted", args)
        wait_for_port(port, timeout, restarted)

    def kill_serverapp(self, timeout: float = 10.0) -> bool:
        """SIGKILL the running ServerApp process (the SuperLink's `flwr-serverapp`; one of an earlier run may
        still be ending) and wait until it is dead (its files closed, its locks released); False if none runs."""
        victims = []
        for identity in descendants(self.superlink.pid) if self.superlink is not None else []:
            try:
                command = Path(f"/proc/{identity[0]}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"flwr-serverapp") for part in command[:2]) and _alive(identity[0]):
                victims.append(identity)
                self._known_pids.add(identity)
                _signal_identity(identity, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(pid) for pid, _ in victims):
            time.sleep(0.05)
        return bool(victims)

    def _write_connection_config(self) -> None:
        write_flwr_config(self.flwr_home, f"{self.superlink_host}:{self.superlink_port}",
                          None if self.tls is None else self.tls.ca_cert)

    def run_app(self, app_dir: Path, *, run_config: Mapping[str, object] | None = None, timeout: float = 120.0,
                on_line: Callable[[str], None] | None = None,
                until: Callable[[str], bool] | None = None) -> RunResult:
        """`flwr run APP_DIR nfed-test --stream`, until the run ends; `on_line` sees each printed line. With
        `until`, `flwr run` is stopped (SIGTERM) after the first line for which it is true (a run whose
        ServerApp was killed streams nothing more until the SuperLink notices, about a minute later)."""
        args = ["flwr", "run", str(app_dir), "nfed-test", "--stream"]
        if run_config:
            args += ["--run-config", format_node_config(run_config)]
        started = time.monotonic()
        process = subprocess.Popen([str(self.bin_dir / args[0]), *args[1:]], env=self.env, cwd=self.workdir,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=_die_with_parent, text=True, bufsize=1)
        self._processes.append(process)
        lines: list[str] = []
        stamped: list[str] = []  # the log file gets seconds since `flwr run` started, for diagnosing timings
        timer = _Watchdog(timeout, lambda: self._stop(process, signal.SIGKILL))
        try:
            for line in process.stdout:
                lines.append(line)
                stamped.append(f"{time.monotonic() - started:7.1f} {line}")
                if on_line is not None:
                    on_line(line)
                if until is not None and until(line):
                    self._stop(process, signal.SIGTERM)
                    break
            process.wait()
        finally:
            timer.cancel()
        output = "".join(lines)
        self._runs += 1
        (self.workdir / f"flwr-run-{self._runs}.log").write_text("".join(stamped))
        if timer.fired:
            raise TimeoutError(f"flwr run did not finish within {timeout:.0f} s; output:\n{output[-4000:]}")
        return RunResult(process.returncode, output, time.monotonic() - started)

    def logs(self) -> str:
        """Every process log of this deployment, for a failing test's message."""
        return "\n".join(f"== {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                         for path in sorted(self.workdir.glob("*.log")))

    def _stop(self, process: subprocess.Popen, sig: int) -> None:
        pids = descendants(process.pid)
        self._known_pids.update(pids)
        if process.poll() is None:
            _signal_quietly(os.killpg, process.pid, sig)
        for identity in pids:
            _signal_identity(identity, sig)

    def close(self, grace: float = 2.0) -> None:
        """Stop every process this deployment started (TERM, then KILL after `grace` seconds)."""
        for process in self._processes:
            self._known_pids.update(descendants(process.pid))
        for process in reversed(self._processes):
            self._stop(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self._processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._stop(process, signal.SIGKILL)
                process.wait()
        for identity in self._known_pids:
            _signal_identity(identity, signal.SIGKILL)
        self._processes.clear()
        self.supernodes.clear()
        self.superlink = None


class _Watchdog:
    """Calls `action` once after `seconds` unless cancelled first."""

    def __init__(self, seconds: float, action: Callable[[], None]):
        import threading

        self.fired = False

        def fire():
            self.fired = True
            action()

        self._timer = threading.Timer(seconds, fire)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()
