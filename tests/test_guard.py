"""End to end: the read-only guard (role replay_guard) in front of a real viewer.

One node, tests in file order: apply with ufw active, the guard rejects every
non-read route of the installed MLflow and path tricks, the reads of the UI
pass, the real UI renders in headless Chromium, basic auth, then teardown.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websocket

from testbench.compare import viewer_differences
from tests.conftest import ARTIFACTS_BUCKET, METRICS_BUCKET, PROJECT_ROOT, make_replay, node_address

pytestmark = pytest.mark.bench

NODE = ("guard1", node_address(41))
PORT = 8000
VIEWER_URL = f"http://{NODE[1]}:{PORT}"
HOST_NAME = "viewer.test"
AUTH_USER = "reader"
AUTH_PASSWORD = "correct horse battery"
# Directory for the UI screenshots, when set (docs/ contains one for the README).
SCREENSHOT_DIR = os.environ.get("MLFLOW_REPLAY_SCREENSHOT_DIR")

# Requests that a path-normalising server could route to a write or outside
# the allowlist. Each must get 403 from the guard.
PATH_TRICKS = (
    ("GET", "/api/2.0/mlflow/../mlflow/experiments/search"),
    ("GET", "/api/2.0/mlflow/%2e%2e/mlflow/experiments/search"),
    ("GET", "/api/2.0/mlflow/%2E%2E/mlflow/experiments/search"),
    ("GET", "/api/2.0/mlflow%2fexperiments%2fsearch"),
    ("GET", "/api/2.0/mlflow%2Fexperiments/search"),
    ("GET", "/api/2.0//mlflow/experiments/search"),
    ("GET", "//api/2.0/mlflow/experiments/search"),
    ("GET", "/api/2.0/mlflow/./experiments/search"),
    ("GET", "/api/2.0/mlflow/experiments/search/."),
    ("GET", "/api/2.0/mlflow%5cexperiments/search"),
    ("GET", "/static-files/../../etc/passwd"),
    ("GET", "/get-artifact/..%2f..%2fetc%2fpasswd"),
    ("PUT", "/api/2.0/mlflow-artifacts/artifacts/../artifacts/x.txt"),
    ("PUT", "/api/2.0/mlflow-artifacts/artifacts/0/x.txt"),
    ("DELETE", "/api/2.0/mlflow-artifacts/artifacts/0/x.txt"),
    ("POST", "/api/2.0/mlflow/experiments/search/../delete"),
    ("POST", "/api/2.0/mlflow/experiments/search%2f..%2fdelete"),
    ("POST", "/api/2.0/mlflow/experiments/delete"),
    ("POST", "/api/2.0/mlflow/experiments/DELETE"),
    ("POST", "/API/2.0/mlflow/experiments/delete"),
    ("GET", "/api/2.0/mlflow/experiments/delete"),
    ("OPTIONS", "/api/2.0/mlflow/experiments/search"),
    ("TRACE", "/api/2.0/mlflow/experiments/search"),
    ("PROPFIND", "/"),
    ("POST", "/v1/traces"),
    ("POST", "/gateway/openai/v1/chat/completions"),
    ("GET", "/ajax-api/3.0/mlflow/assistant/config"),
    ("POST", "/ajax-api/3.0/mlflow/assistant/message"),
)


def _route_table() -> list[dict]:
    """Return the installed MLflow's route table with each route's read flag."""
    code = (
        "import json, sys; sys.path.insert(0, 'scripts'); import guard_routes as g; "
        "print(json.dumps([dict(e, read=g.is_read(e)) for e in g.route_table()]))"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                               text=True, check=True, timeout=300)
    return json.loads(completed.stdout)


def _concrete_path(path: str) -> str:
    """Fill a Flask or FastAPI route path's parameters with sample values."""
    sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
    try:
        from guard_routes import ROUTE_PARAMETER
    finally:
        sys.path.pop(0)
    return ROUTE_PARAMETER.sub(lambda match: "0/x.txt" if "path" in match.group(0) else "0", path)


def request(method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            base: str = VIEWER_URL) -> tuple[int, bytes]:
    """Send one request as written, without following redirects; return status and body."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines += ["Content-Type: application/json", f"Content-Length: {len(body or b'')}"]
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


def _basic_auth_header() -> dict:
    token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_allowlist_matches_installed_mlflow():
    completed = subprocess.run([sys.executable, "scripts/guard_routes.py", "--check"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=300, check=False)

    assert completed.returncode == 0, completed.stderr[-2000:]


@pytest.fixture(scope="module")
def node(bench):
    (booted,) = bench.boot([NODE])
    # ufw from the Debian archive, active, with SSH open so Ansible still gets in.
    booted.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ufw >/dev/null",
               timeout=600)
    booted.run("ufw allow 22/tcp && ufw --force enable")
    return booted


@pytest.fixture(scope="module")
def replay(tmp_path_factory, bench, node, s3, published_store):
    return make_replay(tmp_path_factory.mktemp("guard"), bench, [node], s3, port=PORT)


@pytest.fixture(scope="module")
def applied(replay, node):
    first = replay.runner("apply")
    second = replay.runner("apply")
    return first, second


def test_apply_twice_is_idempotent(applied, node):
    first, second = applied

    assert first.returncode == 0, first.output
    assert second.returncode == 0, second.output
    assert second.recap(node.name)["changed"] == 0, second.output


def test_server_listens_only_on_loopback(applied, node):
    listening = node.run("ss -Htlnp").stdout

    assert f"127.0.0.1:{PORT + 10000} " in listening
    assert f"0.0.0.0:{PORT + 10000} " not in listening
    assert f"0.0.0.0:{PORT} " in listening
    assert "nginx" in listening
    assert ":80 " not in listening


def test_ufw_opens_only_replay_port(applied, node):
    rules = node.run("ufw status").stdout

    assert "Status: active" in rules
    assert f"{PORT}/tcp" in rules
    assert f"{PORT + 10000}" not in rules


def test_viewer_serves_store_through_guard(applied, published_store):
    assert viewer_differences(VIEWER_URL, published_store) == []


def test_non_read_routes_rejected(applied, s3):
    before = {bucket: s3.sha256_of_objects(bucket) for bucket in (METRICS_BUCKET, ARTIFACTS_BUCKET)}
    table = _route_table()
    writes = [entry for entry in table if not entry["read"]]
    prefixes = {entry["path"].split("/")[1] for entry in writes}

    accepted = []
    for entry in writes:
        path = _concrete_path(entry["path"])
        status, body = request(entry["method"], path, body=b"{}")
        if status != 403 or not body.startswith(b"mlflow-replay: rejected"):
            accepted.append(f"{entry['method']} {path}: {status} {body[:120]!r}")
    for method, path in PATH_TRICKS:
        status, body = request(method, path, body=b"{}" if method in ("POST", "PUT") else None)
        if status != 403 or not body.startswith(b"mlflow-replay: rejected"):
            accepted.append(f"{method} {path}: {status} {body[:120]!r}")
    after = {bucket: s3.sha256_of_objects(bucket) for bucket in (METRICS_BUCKET, ARTIFACTS_BUCKET)}

    assert len(writes) > 250, "the route table of MLflow 3.17 has about 300 non-read routes"
    assert {"api", "ajax-api"} <= prefixes
    assert accepted == [], "\n".join(accepted)
    assert after == before


def test_rejection_is_one_line(applied):
    status, body = request("POST", "/api/2.0/mlflow/experiments/delete", body=b'{"experiment_id": "0"}')

    assert status == 403
    assert body == b"mlflow-replay: rejected POST /api/2.0/mlflow/experiments/delete: this viewer is read-only\n"


def test_ui_reads_pass(applied, published_store):
    experiment = published_store.experiment_by_name("mnist-baseline")
    run = published_store.run_by_name("baseline-lr-0.1")
    search = json.dumps({"experiment_ids": [experiment.experiment_id], "max_results": 10}).encode()
    reads = [
        ("GET", "/", None),
        ("GET", "/health", None),
        ("GET", "/version", None),
        ("GET", "/ajax-api/2.0/mlflow/experiments/search?max_results=10", None),
        ("POST", "/ajax-api/2.0/mlflow/experiments/search", b'{"max_results": 10}'),
        ("POST", "/ajax-api/2.0/mlflow/runs/search", search),
        ("POST", "/api/2.0/mlflow/runs/search", search),
        ("GET", f"/ajax-api/2.0/mlflow/runs/get?run_id={run.run_id}", None),
        ("GET", f"/ajax-api/2.0/mlflow/metrics/get-history?run_id={run.run_id}&metric_key=loss", None),
        ("GET", f"/ajax-api/2.0/mlflow/artifacts/list?run_id={run.run_id}", None),
        ("GET", f"/get-artifact?path=README.txt&run_uuid={run.run_id}", None),
        ("GET", f"/get-artifact?path=config%2Fparams.json&run_uuid={run.run_id}", None),
        ("POST", "/graphql", b'{"query": "{ __typename }"}'),
    ]
    failed = []
    for method, path, body in reads:
        status, payload = request(method, path, body=body)
        if status != 200:
            failed.append(f"{method} {path}: {status} {payload[:200]!r}")

    assert failed == []
    assert request("GET", f"/get-artifact?path=README.txt&run_uuid={run.run_id}")[1] == (
        b"Baseline CNN, learning rate 0.1.\n"
    )


class Browser:
    """Headless Chromium driven over the DevTools protocol on a loopback port."""

    def __init__(self, profile_dir: Path, extra_arguments: tuple[str, ...] = ()):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.log = open(profile_dir.parent / f"{profile_dir.name}-chromium.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [shutil.which("chromium") or "/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile_dir}",
             "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={port}",
             "--window-size=1400,900", *extra_arguments, "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.next_id = 0
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                    targets = json.load(response)
                page = next(target for target in targets if target["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.close()
                    raise AssertionError(f"Chromium did not open its DevTools port {port}") from None
                time.sleep(0.5)
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method} failed: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def open_and_wait(self, url: str, condition: str, timeout: float = 90) -> None:
        """Navigate to url and wait until the JavaScript expression condition is true."""
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.evaluate(condition):
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText.slice(0, 1500) : ''")
                raise AssertionError(f"{url}: timed out waiting for {condition}; page text:\n{text}")
            time.sleep(1)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _text_contains(*texts: str) -> str:
    checks = " && ".join(f"document.body.innerText.includes({json.dumps(text)})" for text in texts)
    return f"document.body !== null && {checks}"


def _render_ui(browser: Browser, base_url: str, manifest, screenshot_dir: Path | None = None) -> None:
    """Open the experiment list, a runs table, a metric chart and an artifact preview."""
    experiment = manifest.experiment_by_name("mnist-baseline")
    run = manifest.run_by_name("baseline-lr-0.1")
    browser.send("Page.enable")

    browser.open_and_wait(f"{base_url}/#/experiments", _text_contains("mnist-baseline", "resnet-sweep"))
    browser.open_and_wait(f"{base_url}/#/experiments/{experiment.experiment_id}/runs",
                          _text_contains("baseline-lr-0.1", "diverged"))
    if screenshot_dir:
        browser.screenshot(screenshot_dir / "guard-runs-table.png")
    browser.open_and_wait(
        f"{base_url}/#/experiments/{experiment.experiment_id}/runs/{run.run_id}/model-metrics",
        _text_contains("val_loss") + " && document.querySelectorAll('.js-plotly-plot, canvas').length > 0",
    )
    if screenshot_dir:
        browser.screenshot(screenshot_dir / "guard-metric-chart.png")
    browser.open_and_wait(
        f"{base_url}/#/experiments/{experiment.experiment_id}/runs/{run.run_id}/artifacts/README.txt",
        _text_contains("Baseline CNN, learning rate 0.1."),
    )


@pytest.fixture
def browser_factory(tmp_path):
    browsers = []

    def open_browser(*extra_arguments: str) -> Browser:
        browser = Browser(tmp_path / f"profile{len(browsers)}", extra_arguments)
        browsers.append(browser)
        return browser

    yield open_browser
    for browser in browsers:
        browser.close()


def test_ui_renders_by_address(applied, published_store, browser_factory):
    screenshot_dir = Path(SCREENSHOT_DIR) if SCREENSHOT_DIR else None
    _render_ui(browser_factory(), VIEWER_URL, published_store, screenshot_dir)


def test_ui_renders_by_host_name(applied, published_store, browser_factory):
    browser = browser_factory(f"--host-resolver-rules=MAP {HOST_NAME} {NODE[1]}")
    _render_ui(browser, f"http://{HOST_NAME}:{PORT}", published_store)


def test_basic_auth_requires_login(replay, node, published_store, browser_factory):
    password_hash = subprocess.run(["openssl", "passwd", "-apr1", "-salt", "replaysl", AUTH_PASSWORD],
                                   capture_output=True, text=True, check=True).stdout.strip()
    with replay.inventory.open("a") as inventory:
        inventory.write(f"replay_guard_basic_auth_user={AUTH_USER}\n")
        inventory.write(f"replay_guard_basic_auth_password_hash='{password_hash}'\n")

    first = replay.runner("apply")
    second = replay.runner("apply")
    anonymous = request("GET", "/")[0]
    anonymous_api = request("GET", "/ajax-api/2.0/mlflow/experiments/search?max_results=10")[0]
    wrong = request("GET", "/", headers={"Authorization": "Basic " + base64.b64encode(b"reader:wrong").decode()})[0]
    logged_in = request("GET", "/", headers=_basic_auth_header())[0]

    assert first.returncode == 0, first.output
    assert second.recap(node.name)["changed"] == 0, second.output
    assert anonymous == 401
    assert anonymous_api == 401
    assert wrong == 401
    assert logged_in == 200
    browser = browser_factory()
    browser.send("Network.enable")
    browser.send("Network.setExtraHTTPHeaders", headers=_basic_auth_header())
    _render_ui(browser, VIEWER_URL, published_store)


def test_teardown_removes_guard(replay, node):
    first = replay.runner("teardown")
    second = replay.runner("teardown")

    assert first.returncode == 0, first.output
    assert second.returncode == 0, second.output
    assert second.recap(node.name)["changed"] == 0, second.output
    assert node.run("test -e /usr/sbin/nginx", check=False).returncode != 0
    assert node.run("test -e /etc/nginx/conf.d/mlflow-replay-demo.conf", check=False).returncode != 0
    assert node.run("test -e /etc/ansible/facts.d/mlflow_replay_guard.fact", check=False).returncode != 0
    rules = node.run("ufw status").stdout
    assert "Status: active" in rules
    assert f"{PORT}/tcp" not in rules
    assert "22/tcp" in rules
