"""Real Flower clients on one machine: a SuperLink and one SuperNode per device on 127.0.0.1, an experiment through
`flwr run . CONNECTION`, then everything stopped by pid.

    ditto-deploy [--tls] [--nodes N] [--workdir DIR] [OVERRIDE ...]   # bring up, run, tear down
    ditto-deploy certs DIR [--nodes N] [--host HOST]                  # CA, server certificate, node keys

Each SuperNode is told its device through `--node-config "partition-id=K num-partitions=N state-dir=DIR"` and keeps
its personal model in its own state-dir, so a restarted SuperNode continues from it (`personal_state=disk` and
`round_timeout=180` are the defaults here: see `deployment_overrides`). `--tls` makes a CA, a server certificate (SAN
127.0.0.1 and `--host`) and an ECDSA key per node, starts the SuperLink with TLS and `--enable-supernode-auth`,
registers the node keys before the nodes start, and binds each device to its node's key (`device_keys`: a node is
the device its authenticated key is listed for).
Every process is started in its own session and stopped with its children (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.config.compose import compose_config
from app.paths import PROJECT_DIR
from app.records.results import format_table
from app.runners.launch import flower_env, run_flwr, session_pids, stop

CONNECTION = "deployment"


# -- certificates and node keys ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """Where `make_credentials` wrote the CA, the SuperLink's certificate and key, and the node key pairs."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path]  # private keys (OpenSSH); the public key is beside each, with .pub

    def write_device_keys(self, path: Path, num_devices: int) -> Path:
        """The `device_keys` file binding device k to node key k, for k < num_devices (keys beyond: spares)."""
        listed = {str(k): self.node_keys[k].with_suffix(".pub").read_text().strip() for k in range(num_devices)}
        path.write_text(json.dumps(listed, indent=1))
        return path


def make_credentials(directory: Path, num_nodes: int, host: str = "127.0.0.1", days: int = 365) -> Credentials:
    """A self-signed CA, a server certificate for 127.0.0.1 and `host` signed by it, and one ECDSA (P-384) key pair
    per node in OpenSSH format (Flower refuses ed25519 node keys)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, sans: list[x509.GeneralName] = ()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write_key(key, path: Path, fmt) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = cert("ditto-flower CA", ca_key, "ditto-flower CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    if host not in ("127.0.0.1", "localhost"):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server = cert("ditto-flower SuperLink", server_key, "ditto-flower CA", ca_key, ca=False, sans=sans)
    creds = Credentials(directory / "ca.crt", directory / "server.pem", directory / "server.key", [])
    creds.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    creds.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, creds.server_key, serialization.PrivateFormat.PKCS8)
    for k in range(num_nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        path = directory / f"node-{k}"
        write_key(key, path, serialization.PrivateFormat.OpenSSH)
        path.with_suffix(".pub").write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
        creds.node_keys.append(path)
    return creds


# -- processes ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with code {proc.returncode}: see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s: see {log}")


class LocalDeployment:
    """A SuperLink and `num_nodes` SuperNodes on 127.0.0.1, with their logs, databases, node state and (TLS)
    credentials under `workdir`. Use as a context manager: leaving it stops every process it started.

    TLS: every node key is registered, `spare_keys` more keys are registered but bound to no device (an impostor's
    valid key), and `device_keys` names the file binding device k to key k. `node_config` adds to the node config
    of the devices it names (e.g. `rogue="forge-evaluation"`, app/threats/rogue.py)."""

    def __init__(
        self,
        workdir: Path,
        num_nodes: int,
        *,
        tls: bool = False,
        host: str = "127.0.0.1",
        spare_keys: int = 0,
        node_config: dict[int, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.num_nodes = num_nodes
        self.tls = tls
        self.flwr_home = self.workdir / "flwr"
        self.env = flower_env(self.flwr_home)
        self.port = free_port()
        self.creds = make_credentials(self.workdir / "certs", num_nodes + spare_keys, host) if tls else None
        self.device_keys = None if self.creds is None else self.workdir / "certs" / "device_keys.json"
        self.node_config = node_config or {}
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self._started: list[int] = []

    def state_dir(self, k: int) -> Path:
        return self.workdir / "state" / f"node-{k}"

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log(name), "ab") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._started.append(proc.pid)
        return proc

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self) -> None:
        """Start the SuperLink, write the connection, register the node keys (TLS) and start every node."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        security = (
            ["--insecure"]
            if self.creds is None
            else [
                "--ssl-ca-certfile",
                str(self.creds.ca_cert),
                "--ssl-certfile",
                str(self.creds.server_cert),
                "--ssl-keyfile",
                str(self.creds.server_key),
                "--enable-supernode-auth",
            ]
        )
        self.superlink = self._start(
            "superlink",
            [
                "flower-superlink",
                *security,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.workdir / "superlink.db"),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_for_port(self.port, 60, self.superlink, self.log("superlink"))
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        security_line = "insecure = true" if self.creds is None else f'root-certificates = "{self.creds.ca_cert}"'
        (self.flwr_home / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n{security_line}\n'
        )
        if self.creds is not None:
            for key in self.creds.node_keys:
                self.flwr("supernode", "register", str(key.with_suffix(".pub")), CONNECTION)
            self.creds.write_device_keys(self.device_keys, self.num_nodes)
        for k in range(self.num_nodes):
            self.start_node(k)

    def flwr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A `flwr` CLI command against this deployment."""
        out = subprocess.run(
            ["flwr", *args], cwd=PROJECT_DIR, env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {(out.stdout + out.stderr).strip()[-2000:]}")
        return out

    def start_node(self, k: int, key: Path | None = None, name: str | None = None) -> subprocess.Popen:
        """Start the SuperNode of device `k` (TLS: with node key `key`, by default its own registered one); a
        `name`d node (an intruder, an impostor) claims device `k` from its own state-dir and log."""
        security = (
            ["--insecure"]
            if self.creds is None
            else [
                "--root-certificates",
                str(self.creds.ca_cert),
                "--auth-supernode-private-key",
                str(key or self.creds.node_keys[k]),
            ]
        )
        state_dir = self.state_dir(k) if name is None else self.workdir / "state" / name
        extra = "" if name is not None or k not in self.node_config else f" {self.node_config[k]}"
        node_config = f'partition-id={k} num-partitions={self.num_nodes} state-dir="{state_dir}"{extra}'
        proc = self._start(
            name or f"node-{k}",
            [
                "flower-supernode",
                *security,
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
        )
        if name is None:
            self.nodes[k] = proc
        return proc

    def kill_node(self, k: int) -> None:
        """Kill device `k`'s SuperNode and its children at once (SIGKILL), as a crash would."""
        proc = self.nodes.pop(k)
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def restart_node(self, k: int, deadline: float) -> int:
        """Start device `k`'s SuperNode again until one is activated (its log says "SuperNode ID"; the SuperLink
        refuses a key whose node it still counts online, up to ~60 s after a kill, and the refused node exits) or
        `time.monotonic()` passes `deadline`; returns the number of starts."""
        log = self.log(f"node-{k}")

        def activations() -> int:
            return log.read_text(errors="replace").count("SuperNode ID:") if log.exists() else 0

        starts = 0
        while time.monotonic() < deadline:
            starts, before = starts + 1, activations()
            proc = self.start_node(k)
            while proc.poll() is None and time.monotonic() < deadline:
                if activations() > before:
                    return starts
                time.sleep(0.5)
            self.nodes.pop(k, None)
            time.sleep(2)
        raise RuntimeError(f"device {k}'s SuperNode was not let back in before the deadline: see {log}")

    def run(self, overrides: Sequence[str], output_dir: Path, timeout: float | None = None, echo: bool = True) -> Path:
        """`flwr run . deployment` of the experiment `overrides` (under the deployment's defaults); the path of its
        results.json."""
        return run_flwr(
            deployment_overrides(overrides),
            output_dir,
            flwr_home=self.flwr_home,
            timeout=timeout,
            echo=echo,
            connection=CONNECTION,
        )

    def stop_all(self) -> None:
        """Stop every process this deployment started, with its children, by pid."""
        pids = set().union(*(session_pids(pid) for pid in self._started)) if self._started else set()
        stop(pids)
        self._started.clear()
        self.nodes.clear()


# A round's messages live this long (their TTL) unless the overrides set round_timeout: more than the slowest
# healthy fit or evaluation phase seen on loopback (90 s at load ~18), and a bound on a message Flower never answers:
# one held by a node that is killed and readmitted under the same node id (node auth) before the ServerApp's next
# poll sees it offline. Without a TTL the round would wait 12 h for it (Flower's default;
# docs/maintainers/flower-1.42.md).
ROUND_TIMEOUT = 180


def deployment_overrides(overrides: Sequence[str]) -> list[str]:
    """A deployment's defaults under `overrides`: devices keep their personal models on their own disk, and a round
    waits at most ROUND_TIMEOUT seconds for a reply."""
    overrides = list(overrides)
    defaults = {"personal_state": "disk", "round_timeout": str(ROUND_TIMEOUT)}
    return [f"{k}={v}" for k, v in defaults.items() if not any(o.startswith(f"{k}=") for o in overrides)] + overrides


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["certs"]:
        parser = argparse.ArgumentParser(prog="ditto-deploy certs", description=make_credentials.__doc__)
        parser.add_argument("directory", type=Path)
        parser.add_argument("--nodes", type=int, required=True, help="how many node key pairs")
        parser.add_argument("--host", default="127.0.0.1", help="the SuperLink's address as nodes see it (SAN)")
        args = parser.parse_args(argv[1:])
        creds = make_credentials(args.directory, args.nodes, args.host)
        print(
            f"CA {creds.ca_cert}\nSuperLink certificate {creds.server_cert}, key {creds.server_key}\n"
            f"node keys {creds.node_keys[0]} ... {creds.node_keys[-1]} (public keys: .pub)"
        )
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. num_clients=5 num_rounds=10")
    parser.add_argument("--nodes", type=int, default=None, help="SuperNodes (default: num_clients)")
    parser.add_argument("--tls", action="store_true", help="TLS and SuperNode authentication")
    parser.add_argument("--host", default="127.0.0.1", help="extra SAN of the server certificate (--tls)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: outputs/deploy/<timestamp>")
    args = parser.parse_args(argv)
    overrides = deployment_overrides(args.overrides)
    cfg = compose_config(overrides)  # a bad config: one line, exit status 2 (app/runners/refusals.py)
    nodes = args.nodes or cfg.num_clients
    workdir = (args.workdir or PROJECT_DIR / "outputs" / "deploy" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    if args.tls and not any(o.startswith("device_keys=") for o in overrides):  # each device bound to its node's key
        overrides.append(f"device_keys={workdir / 'certs' / 'device_keys.json'}")
    start = time.perf_counter()
    try:
        with LocalDeployment(workdir, nodes, tls=args.tls, host=args.host) as deployment:
            print(
                f"SuperLink on 127.0.0.1:{deployment.port}, {nodes} SuperNodes; logs in {workdir / 'logs'}", flush=True
            )
            path = deployment.run(overrides, workdir / "results")
    except Exception as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"\n{format_table(json.loads(path.read_text())['final'])}\n\nresults: {path.parent}; personal models: "
        f"{workdir / 'state'}  (wall time {time.perf_counter() - start:.0f} s)"
    )
    return 0
