"""Start, probe and stop a moto S3 server for the end-to-end tests.

moto keeps every bucket in the memory of its process, so stopping the server
discards all objects. moto accepts any credentials. The bench still uses the
fixed, non-default keys below, so that the product's credential handling is
exercised with values that cannot come from a developer's own AWS setup.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

TEST_ACCESS_KEY = "testbench-access-key"
TEST_SECRET_KEY = "testbench-secret-key"
TEST_REGION = "us-east-1"

STARTUP_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
LOG_TAIL_BYTES = 4000

# Runs inside the network namespace, so the probe reaches the address the
# server binds to even when the host has no route to it. Exit status 0 means
# the server sent an HTTP response.
_PROBE_SCRIPT = """
import sys, urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    opener.open(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
except Exception:
    sys.exit(1)
"""


def without_proxy_variables(env: dict[str, str]) -> dict[str, str]:
    """Return a copy of env without HTTP proxy settings, which must not route test traffic."""
    proxy_names = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    return {name: value for name, value in env.items() if name.lower() not in proxy_names}


def read_log_tail(log_path: Path, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """Return up to max_bytes from the end of a log file, or a note when it is missing."""
    try:
        data = log_path.read_bytes()
    except FileNotFoundError:
        return f"(log file {log_path} is missing)"
    return data[-max_bytes:].decode("utf-8", errors="replace")


def _session_members(session_id: int) -> list[int]:
    """Return the PIDs of live processes in the session, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name in field 2 may contain spaces, so split after its ")".
        fields = stat.rsplit(")", 1)[1].split()
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            members.append(int(entry))
    return members


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """Stop a process started with start_new_session=True and every process left in its session.

    The leader gets SIGTERM, then SIGKILL if it has not exited within timeout.
    Children that outlive it, such as the uvicorn worker that `mlflow server`
    spawns, are then killed by PID. They are in the leader's session because
    the bench started the leader in a new session, so no foreign process is hit.
    """
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)

    leftovers = _session_members(process.pid)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.1)
        leftovers = _session_members(process.pid)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class S3Server:
    """A running moto S3 server and the credentials its clients use."""

    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log_path: Path
    netns: str | None = None
    region: str = TEST_REGION
    _client: object | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self):
        """Return a boto3 S3 client for this server, using path-style addressing.

        The client talks to the endpoint from the current network namespace, so a
        server started with netns must be reachable from here.
        """
        if self._client is None:
            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
                config=Config(s3={"addressing_style": "path"}),
            )
        return self._client

    def aws_environment(self) -> dict[str, str]:
        """Return the environment variables that point boto3 and MLflow at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Return every object key in the bucket under prefix, sorted."""
        paginator = self.client().get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def sha256_of_objects(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """Return the hex SHA-256 of every object under prefix, keyed by object key."""
        client = self.client()
        digests = {}
        for key in self.list_keys(bucket, prefix):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            digests[key] = hashlib.sha256(body).hexdigest()
        return digests

    def stop(self) -> None:
        """Stop the server by PID and wait for it to exit. All its buckets are lost."""
        stop_process(self.process)


def _server_responds(url: str, netns: str | None) -> bool:
    if netns is None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            opener.open(url, timeout=2)
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False
        return True
    probe = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", _PROBE_SCRIPT, url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=10,
    )
    return probe.returncode == 0


def start_s3_server(
    address: str = "127.0.0.1",
    port: int = 9000,
    netns: str | None = None,
    log_path: Path | None = None,
    timeout: float = STARTUP_TIMEOUT_SECONDS,
    extra_env: dict[str, str] | None = None,
) -> S3Server:
    """Start `python -m moto.server` on address:port and wait until it responds over HTTP.

    With netns, the server runs under `ip netns exec <netns>`, and the namespace
    must already exist. The log goes to log_path, or to a new temporary file.
    extra_env adds variables to moto's environment: INITIAL_NO_AUTH_ACTION_COUNT=0
    makes moto authenticate every request, so it rejects keys unknown to its IAM.
    Raises RuntimeError with the log tail when the server exits or does not
    respond within timeout seconds, after stopping it.
    """
    if log_path is None:
        log_fd, log_name = tempfile.mkstemp(prefix="moto-s3-", suffix=".log")
        os.close(log_fd)
        log_path = Path(log_name)
    log_path = Path(log_path)

    command = [sys.executable, "-m", "moto.server", "-H", address, "-p", str(port)]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]

    env = without_proxy_variables(dict(os.environ))
    env.update(extra_env or {})
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    host = f"[{address}]" if ":" in address else address
    server = S3Server(
        endpoint=f"http://{host}:{port}",
        access_key=TEST_ACCESS_KEY,
        secret_key=TEST_SECRET_KEY,
        process=process,
        log_path=log_path,
        netns=netns,
    )

    probe_url = f"{server.endpoint}/moto-api/"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"moto S3 server exited with status {process.returncode} before responding "
                f"on {server.endpoint}. Log tail of {log_path}:\n{read_log_tail(log_path)}"
            )
        if _server_responds(probe_url, netns):
            if process.poll() is None:
                return server
            # Another server on the same address and port responded, and ours exited.
            continue
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"moto S3 server did not respond on {server.endpoint} within {timeout:.0f} s "
                f"and was stopped. Log tail of {log_path}:\n{read_log_tail(log_path)}"
            )
        time.sleep(0.2)


def rclone_environment(server: S3Server) -> dict[str, str]:
    """Return an environment that configures rclone's on-the-fly `:s3:` remote for server.

    Credentials travel in environment variables so they never show in `ps`.
    AWS_CA_BUNDLE is removed because rclone 1.60 (Debian 12) fails with
    LoadCustomCABundleError when it is set. The remote does not create or check
    buckets, so a missing bucket fails the copy instead of being created.
    """
    env = without_proxy_variables(dict(os.environ))
    env.pop("AWS_CA_BUNDLE", None)
    env.update(
        {
            "RCLONE_S3_PROVIDER": "Other",
            "RCLONE_S3_ENDPOINT": server.endpoint,
            "RCLONE_S3_REGION": server.region,
            "RCLONE_S3_ACCESS_KEY_ID": server.access_key,
            "RCLONE_S3_SECRET_ACCESS_KEY": server.secret_key,
            "RCLONE_S3_ENV_AUTH": "false",
            "RCLONE_S3_FORCE_PATH_STYLE": "true",
            "RCLONE_S3_NO_CHECK_BUCKET": "true",
            # Skips the HEAD request after each upload, but the PUT response's ETag
            # is still checked. On a 2-core machine this cut a 4502-object upload
            # to moto from 43 s to 21 s.
            "RCLONE_S3_NO_HEAD": "true",
            # An empty value makes rclone run without reading any config file.
            "RCLONE_CONFIG": "",
        }
    )
    return env


def s3_remote_path(bucket: str, prefix: str = "") -> str:
    """Return the rclone path `:s3:<bucket>/<prefix>` for the on-the-fly S3 remote."""
    prefix = prefix.strip("/")
    return f":s3:{bucket}/{prefix}" if prefix else f":s3:{bucket}"


def rclone_copy(server: S3Server, source: str | Path, destination: str | Path) -> None:
    """Run `rclone copy source destination`, where either side may be an s3_remote_path().

    rclone copies files only, so empty directories of a local source do not
    reach the bucket. Raises RuntimeError with rclone's output when it fails.
    rclone's own retries (3 attempts by default) apply.
    """
    command = ["rclone", "copy", "--verbose", str(source), str(destination)]
    result = subprocess.run(
        command,
        env=rclone_environment(server),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"rclone copy {source} {destination} failed with status {result.returncode}:\n"
            f"{result.stderr[-LOG_TAIL_BYTES:]}"
        )
