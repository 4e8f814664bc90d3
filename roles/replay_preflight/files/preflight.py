"""Check, before anything on the node changes, that each replay can work here.

Usage: /usr/bin/python3 preflight.py INPUT_FILE

INPUT_FILE is a JSON file (mode 0600, written by a no_log task) holding the
credentials and the replays. The script deletes it as soon as it has read it,
so the secret is never in argv, in the environment or in the output. It uses
the standard library only, because it runs before rclone or anything else is
installed.

For each replay it checks that:
- the endpoint resolves, accepts a TCP connection and completes TLS for https,
- the credentials are accepted,
- the metrics container contains an MLflow file store at the prefix,
- the artifacts container is readable,
- the port and the server's loopback port are free or already serve this replay,
- the state root has room for a snapshot.

It prints one line per problem and exits 1 if there is any, else it exits 0
with no output.
"""

import datetime
import hashlib
import hmac
import json
import os
import re
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ElementTree

# Region in the SigV4 credential scope. rclone (provider Ceph, no region set)
# signs with the same one, and Ceph RGW accepts it.
REGION = "us-east-1"
TIMEOUT_SECONDS = 10
MAX_KEYS = 1000
# Stop listing a store after this many pages (1000 keys each). The size
# estimate of a larger store is then a lower bound.
MAX_PAGES = 200
MEBIBYTE = 1024 * 1024


class CheckFailed(Exception):
    """A failed check; the message names the setting, the value and the fix."""


# --- S3 requests ---------------------------------------------------------------


def _uri_encode(text):
    return urllib.parse.quote(text, safe="-_.~")


def _sign(key, message):
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def signed_headers(credentials, host, path, query):
    """Return the SigV4 headers of a GET request with an empty body."""
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(b"").hexdigest()
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    names = sorted(headers)
    canonical_request = "\n".join([
        "GET",
        path,
        query,
        "".join(f"{name}:{headers[name]}\n" for name in names),
        ";".join(names),
        payload_hash,
    ])
    scope = f"{day}/{REGION}/s3/aws4_request"
    string_to_sign = "\n".join([
        "AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
    ])
    key = _sign(("AWS4" + credentials["secret_key"]).encode("utf-8"), day)
    for part in (REGION, "s3", "aws4_request"):
        key = _sign(key, part)
    signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials['access_key']}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return headers


def list_objects(endpoint, credentials, bucket, prefix, delimiter=None, max_keys=MAX_KEYS, token=None):
    """Send one ListObjectsV2 request (path style) and return the parsed XML root.

    `credentials` None sends an unsigned request. Raises urllib.error.HTTPError
    for an HTTP error status and OSError for a network failure.
    """
    parameters = {"list-type": "2", "max-keys": str(max_keys), "prefix": prefix}
    if delimiter:
        parameters["delimiter"] = delimiter
    if token:
        parameters["continuation-token"] = token
    query = "&".join(f"{_uri_encode(k)}={_uri_encode(v)}" for k, v in sorted(parameters.items()))
    parts = urllib.parse.urlsplit(endpoint)
    path = "/" + _uri_encode(bucket)
    headers = {"host": parts.netloc}
    if credentials is not None:
        headers = signed_headers(credentials, parts.netloc, path, query)
    request = urllib.request.Request(f"{endpoint}{path}?{query}", headers=headers, method="GET")
    # Proxies are bypassed, because check_connection tested the direct route.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=TIMEOUT_SECONDS) as response:
        return ElementTree.fromstring(response.read())


def _error_code(error):
    try:
        root = ElementTree.fromstring(error.read())
    except (ElementTree.ParseError, OSError):
        return ""
    code = _find(root, "Code")
    return (code.text or "") if code is not None else ""


def _children(element, name):
    """Return the child elements called `name`, with or without the S3 XML namespace."""
    return [child for child in element if child.tag.rsplit("}", 1)[-1] == name]


def _find(element, name):
    children = _children(element, name)
    return children[0] if children else None


def list_container(replay, credentials, field, bucket, prefix, **options):
    """Return the ListObjectsV2 root, or raise CheckFailed naming the field."""
    try:
        return list_objects(replay["endpoint"], credentials, bucket, prefix, **options)
    except urllib.error.HTTPError as error:
        code = _error_code(error)
        status = f"HTTP {error.code}" + (f" {code}" if code else "")
        if error.code == 404 or code == "NoSuchBucket":
            raise CheckFailed(
                f"{field}: container '{bucket}' not found on {replay['endpoint']} ({status}). "
                "Check the container name and that it lives on this endpoint (site)."
            ) from None
        if error.code in (401, 403):
            if replay["anonymous"]:
                raise CheckFailed(
                    f"{field}: anonymous access to container '{bucket}' was rejected ({status}). "
                    "The container is not public: set anonymous: false and export your EC2 credentials."
                ) from None
            if code in ("AccessDenied", "AllAccessDisabled"):
                raise CheckFailed(
                    f"{field}: access to container '{bucket}' denied ({status}): the credentials were "
                    "accepted but have no read permission there. Use credentials of the container's project."
                ) from None
            raise CheckFailed(
                f"AWS_ACCESS_KEY_ID: credentials rejected by {replay['endpoint']} ({status}). "
                "Export valid EC2 credentials (`openstack ec2 credentials list`) for this site."
            ) from None
        raise CheckFailed(
            f"{field}: listing container '{bucket}' on {replay['endpoint']} failed ({status}). "
            "Check that the endpoint is an S3 service."
        ) from None
    except (OSError, ElementTree.ParseError) as error:
        raise CheckFailed(
            f"endpoint: request to {replay['endpoint']} failed ({error}). Check that the endpoint is an S3 service."
        ) from None


# --- Checks -----------------------------------------------------------------


def check_connection(endpoint):
    """Resolve the endpoint, connect over TCP and complete TLS for https."""
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise CheckFailed(
            f"endpoint: host '{host}' of {endpoint} does not resolve on this node ({error.strerror}). "
            "Check the spelling of the endpoint or the container URL."
        ) from None
    family, kind, protocol, _, address = addresses[0]
    connection = socket.socket(family, kind, protocol)
    connection.settimeout(TIMEOUT_SECONDS)
    try:
        connection.connect(address)
    except socket.timeout:
        connection.close()
        raise CheckFailed(
            f"endpoint: connection to {endpoint} ({address[0]} port {port}) timed out after "
            f"{TIMEOUT_SECONDS} s. Check the port and any firewall between this node and the object store."
        ) from None
    except ConnectionRefusedError:
        connection.close()
        raise CheckFailed(
            f"endpoint: connection to {endpoint} ({address[0]} port {port}) refused: nothing listens "
            "there. Check the port of the endpoint (Chameleon's object store uses 7480)."
        ) from None
    except OSError as error:
        connection.close()
        raise CheckFailed(
            f"endpoint: {endpoint} ({address[0]} port {port}) is unreachable from this node "
            f"({error.strerror}). Check the address and the node's network."
        ) from None
    try:
        if parts.scheme == "https":
            context = ssl.create_default_context()
            try:
                context.wrap_socket(connection, server_hostname=host).close()
            except ssl.SSLCertVerificationError as error:
                raise CheckFailed(
                    f"endpoint: the TLS certificate of {endpoint} is not trusted ({error.verify_message}). "
                    "Use the endpoint's real host name, or install its CA certificate on the node."
                ) from None
            except (ssl.SSLError, OSError) as error:
                raise CheckFailed(
                    f"endpoint: TLS handshake with {endpoint} failed ({error}). "
                    "If the server speaks plain HTTP, use an http:// endpoint."
                ) from None
    finally:
        connection.close()


def describe_layout(keys, prefix):
    """Return None if `keys` (relative to the prefix) form an MLflow file store, else why not."""
    if not keys:
        return "is empty"
    for key in keys:
        if key.count("/") == 1 and key.endswith("/meta.yaml"):
            return None
    # A store deeper down, such as 'mlruns/<experiment>/meta.yaml': its root is
    # two levels above the shallowest meta.yaml.
    depths = sorted((key.count("/"), key) for key in keys if key.endswith("/meta.yaml"))
    if depths and depths[0][0] >= 2:
        root = depths[0][1].rsplit("/", 2)[0]
        suggested = f"{prefix}/{root}" if prefix else root
        return f"holds an MLflow file store in '{root}/': use the prefix '{suggested}'"
    if any(len(key.split("/")) >= 4 and key.split("/")[2] == "artifacts" for key in keys):
        return ("looks like an artifacts container (<experiment>/<run>/artifacts/...) and has no "
                "<experiment>/meta.yaml: give the container of the mlruns tree instead")
    examples = ", ".join(sorted(keys)[:3])
    return f"holds {len(keys)} objects but no <experiment>/meta.yaml (for example {examples})"


def check_metrics_store(replay, credentials):
    """Return the total size in bytes of the store; raise CheckFailed if it is no MLflow store."""
    metrics = replay["metrics"]
    prefix = metrics["prefix"].strip("/")
    listing_prefix = f"{prefix}/" if prefix else ""
    keys, size, token = [], 0, None
    for _ in range(MAX_PAGES):
        root = list_container(replay, credentials, "metrics_container", metrics["bucket"], listing_prefix,
                              token=token)
        for item in _children(root, "Contents"):
            keys.append((_find(item, "Key").text or "")[len(listing_prefix):])
            size += int(_find(item, "Size").text or 0)
        truncated = _find(root, "IsTruncated")
        token_element = _find(root, "NextContinuationToken")
        if truncated is None or truncated.text != "true" or token_element is None:
            break
        token = token_element.text
    problem = describe_layout(keys, prefix)
    if problem:
        where = f"'{metrics['bucket']}'" + (f" under prefix '{prefix}'" if prefix else "")
        raise CheckFailed(f"metrics_container: container {where} is not an MLflow file store: it {problem}.")
    return size


def check_artifacts_readable(replay, credentials):
    artifacts = replay["artifacts"]
    prefix = artifacts["prefix"].strip("/")
    list_container(replay, credentials, "artifacts_container", artifacts["bucket"],
                   f"{prefix}/" if prefix else "", max_keys=1)


def _listening_inodes(port):
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    if fields[3] == "0A" and local_port == port:
                        inodes.add(fields[9])
        except FileNotFoundError:
            continue
    return inodes


def _socket_holders(inodes):
    """Return the PIDs of the processes that own one of the socket `inodes`."""
    targets = {f"socket:[{inode}]" for inode in inodes}
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            descriptors = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(f"/proc/{entry}/fd/{descriptor}") in targets:
                    holders.append(int(entry))
                    break
            except OSError:
                continue
    return holders


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def _guard_listens(port, settings):
    """Return True if a replay's guard site (role replay_guard) listens on `port`."""
    site_dir = settings.get("guard_site_dir", "/etc/nginx/conf.d")
    listen = re.compile(rf"^\s*listen\s+(?:\[::\]:|[0-9.]+:)?{port}[\s;]", re.MULTILINE)
    try:
        names = os.listdir(site_dir)
    except OSError:
        return False
    prefix = settings.get("unit_prefix", "mlflow-replay") + "-"
    return any(
        name.startswith(prefix) and name.endswith(".conf") and listen.search(_read(os.path.join(site_dir, name)))
        for name in names
    )


def _held_by_replay(pid, port, replay, settings):
    """Return True if process `pid` serves `port` for a replay, so apply may take the port over.

    That is this replay's server unit, the Docker proxy of this replay's
    stack, or the nginx of a replay's read-only guard.
    """
    cgroup = _read(f"/proc/{pid}/cgroup")
    if "/" + replay["server_unit"] in cgroup:
        return True
    stack_unit = f"/etc/systemd/system/{settings.get('unit_prefix', 'mlflow-replay')}-{replay['name']}-stack.service"
    if _read(f"/proc/{pid}/comm").strip() == "docker-proxy" and os.path.exists(stack_unit):
        return True
    return "/nginx.service" in cgroup and _guard_listens(port, settings)


def _check_one_port(port, description, replay, settings):
    inodes = _listening_inodes(port)
    if not inodes:
        return
    holders = _socket_holders(inodes)
    if holders and all(_held_by_replay(pid, port, replay, settings) for pid in holders):
        return
    names = ", ".join(f"{_read(f'/proc/{pid}/comm').strip() or '?'} (pid {pid})" for pid in holders)
    raise CheckFailed(
        f"port: {description} is already in use on this node by {names or 'another process'}, "
        f"not by this replay. Choose another port, or stop that process."
    )


def check_port(replay, settings):
    """Require the replay's port, and the loopback port of its server, to be free or its own."""
    _check_one_port(replay["port"], str(replay["port"]), replay, settings)
    server_port = replay.get("server_port")
    if server_port is not None and server_port != replay["port"]:
        _check_one_port(server_port, f"{server_port} (the MLflow server's port behind port {replay['port']})",
                        replay, settings)


def _tree_size(path):
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                continue
    return total


def check_disk(replay, store_size, settings):
    """Require free space for a new snapshot: factor x store size + margin."""
    existing = settings["state_root"]
    while not os.path.exists(existing):
        existing = os.path.dirname(existing) or "/"
    status = os.statvfs(existing)
    # The mirror and database already in the state directory count as available:
    # an import updates the mirror in place and replaces the database.
    # NOTE: each replay is checked alone, so several replays on one node may
    # together need more than the free space.
    available = status.f_bavail * status.f_frsize + _tree_size(replay["state_dir"])
    required = settings["disk_factor"] * store_size + settings["disk_margin_mib"] * MEBIBYTE
    if available < required:
        raise CheckFailed(
            f"metrics_container: the store is {store_size / MEBIBYTE:.0f} MiB and a snapshot needs about "
            f"{required / MEBIBYTE:.0f} MiB under {settings['state_root']}, but only "
            f"{available / MEBIBYTE:.0f} MiB are free on {existing}. Free disk space on the node."
        )


def check_replay(replay, credentials, settings):
    """Return the problems of one replay, as messages prefixed with its name."""
    problems = []
    try:
        check_connection(replay["endpoint"])
        store_size = check_metrics_store(replay, credentials)
        check_artifacts_readable(replay, credentials)
        check_disk(replay, store_size, settings)
    except CheckFailed as error:
        problems.append(str(error))
    try:
        check_port(replay, settings)
    except CheckFailed as error:
        problems.append(str(error))
    return [f"replay '{replay['name']}': {problem}" for problem in problems]


def main(argv):
    input_path = argv[1]
    with open(input_path, encoding="utf-8") as handle:
        settings = json.load(handle)
    os.unlink(input_path)
    problems = []
    for replay in settings["replays"]:
        credentials = None
        if not replay["anonymous"]:
            credentials = {"access_key": settings["access_key"], "secret_key": settings["secret_key"]}
        problems.extend(check_replay(replay, credentials, settings))
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
