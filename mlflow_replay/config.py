"""Turn the user's vars into a list of normalised replays.

This module is the one source of truth for what a vars file means. runner.py
calls it to validate before any node is touched, and the Ansible filter
`mlflow_replay_replays` calls it inside the play, so a playbook run without the
runner reads the vars the same way.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

RUNTIMES = ("native", "docker")
DEFAULT_PORT = 8000
DEFAULT_RUNTIME = "docker"
DEFAULT_NAME = "default"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
# S3 bucket names as Ceph RGW and AWS accept them; Swift container names are
# freer, but a container that S3 cannot address cannot be mounted here.
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
SWIFT_PATH = re.compile(r"^/swift/v1/(AUTH_[^/]+)/(.+)$")

# Chameleon sites and the S3 endpoint of their object store. KVM@TACC has no
# object store of its own and uses CHI@TACC's.
SITE_ENDPOINTS = {
    "CHI@TACC": "https://chi.tacc.chameleoncloud.org:7480",
    "KVM@TACC": "https://chi.tacc.chameleoncloud.org:7480",
    "CHI@UC": "https://chi.uc.chameleoncloud.org:7480",
}

# The top-level keys of the single-replay form of the vars file.
REPLAY_KEYS = (
    "name",
    "site",
    "metrics_container",
    "artifacts_container",
    "endpoint",
    "port",
    "runtime",
    "anonymous",
    "workers",
)


class ConfigError(ValueError):
    """An invalid setting: names the field, the value and the fix."""

    def __init__(self, field: str, value: object, problem: str, fix: str):
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        shown = "" if value is None else f" (got {value!r})"
        super().__init__(f"{field}: {problem}{shown}. {fix}")


@dataclass(frozen=True)
class ContainerRef:
    """A container (S3 bucket) and the prefix under which the data sits."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None

    @property
    def remote_path(self) -> str:
        """Return `bucket` or `bucket/prefix`, as rclone addresses it."""
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket


def parse_container(field: str, value: object) -> ContainerRef:
    """Parse a container reference: a name, `name/prefix`, s3:// or an https URL.

    A Swift URL (`https://HOST/swift/v1/AUTH_<project>/<container>[/prefix]`)
    and an S3 path-style URL (`https://HOST/<bucket>[/prefix]`) also yield the
    endpoint `scheme://HOST`. Raises ConfigError for anything else.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            field, value, "must be a non-empty string",
            "Give a container name such as 'my-mlruns' or its public URL.",
        )
    text = value.strip()
    if "://" not in text:
        return _split_bucket_path(field, value, text, endpoint=None)

    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise ConfigError(
            field, value, "a container URL takes no query string or fragment",
            "Remove everything from '?' or '#' on.",
        )
    if parts.scheme == "s3":
        return _split_bucket_path(field, value, parts.netloc + parts.path, endpoint=None)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            field, value, "unsupported URL",
            "Use an https:// Swift or S3 URL, s3://bucket, or a bare container name.",
        )
    endpoint = f"{parts.scheme}://{parts.netloc}"
    swift = SWIFT_PATH.match(parts.path)
    # NOTE: a Swift URL names the owner's project (AUTH_<project>). Ceph RGW with
    # per-project tenants would address that bucket over S3 as
    # '<project>:<container>'; this parser keeps the bare container name, which
    # is what Chameleon users have used so far.
    path = swift.group(2) if swift else parts.path
    return _split_bucket_path(field, value, path, endpoint=endpoint)


def _split_bucket_path(field: str, value: object, path: str, endpoint: str | None) -> ContainerRef:
    segments = [segment for segment in path.split("/") if segment]
    if not segments:
        raise ConfigError(
            field, value, "no container name found",
            "Add the container name, for example 'my-mlruns'.",
        )
    bucket, prefix = segments[0], "/".join(segments[1:])
    if not BUCKET_PATTERN.match(bucket):
        raise ConfigError(
            field, value, f"'{bucket}' is not a valid S3 bucket name",
            "Use 3-63 lower-case letters, digits, dots, dashes or underscores.",
        )
    if any(segment in (".", "..") for segment in segments):
        raise ConfigError(field, value, "'.' and '..' are not allowed in a prefix", "Give the plain prefix.")
    return ContainerRef(bucket=bucket, prefix=prefix, endpoint=endpoint)


def parse_endpoint(value: object) -> str:
    """Return the endpoint as `scheme://host[:port]`, or raise ConfigError."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            "endpoint", value, "must be a non-empty URL",
            "Set it to your S3 endpoint, e.g. https://chi.tacc.chameleoncloud.org:7480.",
        )
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "endpoint", value, "must start with http:// or https:// and name a host",
            "For example https://chi.tacc.chameleoncloud.org:7480.",
        )
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ConfigError(
            "endpoint", value, "must be the server address only, without a path",
            f"Use {parts.scheme}://{parts.netloc} and put the container in metrics_container.",
        )
    try:
        parts.port  # noqa: B018 (raises ValueError for a non-numeric port)
    except ValueError:
        raise ConfigError("endpoint", value, "has an invalid port", "Use host:PORT with PORT a number.") from None
    return f"{parts.scheme}://{parts.netloc}"


def _site_endpoint(settings: dict) -> str | None:
    site = settings.get("site")
    if site is None:
        return None
    if site not in SITE_ENDPOINTS:
        raise ConfigError("site", site, "is not a Chameleon site with an object store",
                          f"Use one of: {', '.join(SITE_ENDPOINTS)}.")
    endpoint = SITE_ENDPOINTS[site]
    given = settings.get("endpoint")
    if given is not None and parse_endpoint(given) != endpoint:
        raise ConfigError("endpoint", given, f"disagrees with site {site}, whose endpoint is {endpoint}",
                          "Remove one of 'site' and 'endpoint'.")
    return endpoint


def _resolve_endpoint(settings: dict, metrics: ContainerRef, artifacts: ContainerRef) -> str:
    given = settings.get("endpoint", _site_endpoint(settings))
    derived = {ref.endpoint for ref in (metrics, artifacts) if ref.endpoint}
    if given is not None:
        endpoint = parse_endpoint(given)
        for other in derived:
            if other != endpoint:
                raise ConfigError(
                    "endpoint", given, f"disagrees with the container URL's endpoint {other}",
                    "Remove 'endpoint' or make the container URLs use the same host.",
                )
        return endpoint
    if len(derived) == 1:
        return derived.pop()
    if len(derived) > 1:
        raise ConfigError(
            "metrics_container", settings.get("metrics_container"),
            "the two container URLs name different endpoints",
            "Both containers must live on the same object store.",
        )
    raise ConfigError(
        "endpoint", None, "is missing",
        "Set 'endpoint', or give a container as a full URL.",
    )


def _parse_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError("port", value, "must be an integer from 1 to 65535", "For example port: 8000.")
    return value


def _parse_name(value: object) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ConfigError(
            "name", value, "must be 1-32 lower-case letters, digits or dashes, starting with a letter",
            "For example name: demo.",
        )
    return value


def normalise_replay(settings: dict, layout: dict) -> dict:
    """Validate one replay's settings and return it with every derived path.

    `layout` contains the root directories and the unit prefix (the role
    defaults); each path of the result is the root joined with the replay name.
    """
    name = _parse_name(settings.get("name", DEFAULT_NAME))
    metrics = parse_container("metrics_container", settings.get("metrics_container"))
    artifacts = parse_container("artifacts_container", settings.get("artifacts_container"))
    endpoint = _resolve_endpoint(settings, metrics, artifacts)
    runtime = settings.get("runtime", DEFAULT_RUNTIME)
    if runtime not in RUNTIMES:
        raise ConfigError("runtime", runtime, "is not supported", f"Use one of: {', '.join(RUNTIMES)}.")
    anonymous = settings.get("anonymous", False)
    if not isinstance(anonymous, bool):
        raise ConfigError("anonymous", anonymous, "must be true or false", "Write anonymous: true or leave it out.")
    # One worker keeps a whole replay near 400 MB and serves one user's page
    # as fast as two (docs/benchmarks.md). Each more worker adds up to 300 MB.
    workers = settings.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 16:
        raise ConfigError("workers", workers, "must be an integer from 1 to 16", "The default is 1.")

    port = _parse_port(settings.get("port", DEFAULT_PORT))
    paths = replay_paths(name, layout)
    for mount in paths["mounts"]:
        mount["remote_path"] = (metrics if mount["kind"] == "metrics" else artifacts).remote_path
    return {
        "name": name,
        "runtime": runtime,
        "port": port,
        # MLflow listens on loopback on server_port; the read-only guard
        # (role replay_guard) listens on the public port and forwards reads.
        "server_port": port + 10000 if port <= 55535 else port - 10000,
        "endpoint": endpoint,
        "anonymous": anonymous,
        "workers": workers,
        "metrics": {"bucket": metrics.bucket, "prefix": metrics.prefix, "remote_path": metrics.remote_path},
        "artifacts": {"bucket": artifacts.bucket, "prefix": artifacts.prefix, "remote_path": artifacts.remote_path},
        **paths,
    }


def replay_paths(name: str, layout: dict) -> dict:
    """Return the node paths and unit names of the replay called `name`.

    Teardown uses this alone, with names found on the node, so that it can
    remove a replay whose settings are gone or invalid.
    """
    unit = f"{layout['unit_prefix']}-{name}"
    state_dir = f"{layout['state_root']}/{name}"
    mount_dir = f"{layout['mount_root']}/{name}"
    return {
        "name": name,
        "config_dir": f"{layout['config_root']}/{name}",
        "rclone_config": f"{layout['config_root']}/{name}/rclone.conf",
        "cache_dir": f"{layout['cache_root']}/{name}",
        "state_dir": state_dir,
        "database": f"{state_dir}/snapshot.db",
        "mirror_dir": f"{state_dir}/mirror",
        "fingerprint_file": f"{state_dir}/source.fingerprint",
        "mount_dir": mount_dir,
        "metrics_mount": f"{mount_dir}/metrics",
        "artifacts_mount": f"{mount_dir}/artifacts",
        "metrics_unit": f"{unit}-metrics.service",
        "artifacts_unit": f"{unit}-artifacts.service",
        "server_unit": f"{unit}-server.service",
        "mounts": [
            {
                "kind": kind,
                "unit": f"{unit}-{kind}.service",
                "path": f"{mount_dir}/{kind}",
                "cache_dir": f"{layout['cache_root']}/{name}/{kind}",
            }
            for kind in ("metrics", "artifacts")
        ],
    }


# Keys that, in the list form, may stand at the top level as defaults for
# every replay of the list. The others differ per replay by nature.
SHARED_KEYS = ("site", "endpoint", "runtime", "anonymous", "workers")


def check_known_keys(settings: dict, known: tuple = REPLAY_KEYS + ("replays",), where: str = "") -> None:
    """Raise ConfigError for a key that is not a setting, suggesting the closest one."""
    for key in settings:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
        fix = f"Did you mean '{close[0]}'?" if close else f"Known keys: {', '.join(known)}."
        raise ConfigError(f"{where}{key}", settings[key], "is not a known setting", fix)


def _list_items(settings: dict) -> list[dict]:
    """Return the replays of the list form, each merged over the shared keys."""
    items = settings["replays"]
    if not isinstance(items, list) or not items:
        raise ConfigError("replays", items, "must be a non-empty list of replays",
                          "Write one '- name: ...' entry per replay, or use the single-replay keys instead.")
    for key in ("name", "metrics_container", "artifacts_container", "port"):
        if key in settings:
            raise ConfigError(key, settings[key], "cannot stand beside 'replays'",
                              f"Move '{key}' into each entry of 'replays'.")
    shared = {key: settings[key] for key in SHARED_KEYS if key in settings}
    merged = []
    for index, item in enumerate(items):
        where = f"replays[{index}]."
        if not isinstance(item, dict):
            raise ConfigError(f"replays[{index}]", item, "must be a mapping of settings",
                              "Write it as '- name: ...' followed by its keys.")
        if "name" not in item:
            raise ConfigError(f"{where}name", None, "is missing", "Every replay in the list needs its own name.")
        check_known_keys(item, known=REPLAY_KEYS, where=where)
        merged.append({**shared, **item})
    return merged


def _check_unique(replays: list[dict], key: str, fix: str) -> None:
    seen = {}
    for index, replay in enumerate(replays):
        value = replay[key]
        if value in seen:
            raise ConfigError(f"replays[{index}].{key}", value,
                              f"is already used by replay '{replays[seen[value]]['name']}'", fix)
        seen[value] = index


def normalise_replays(settings: dict, layout: dict) -> list[dict]:
    """Validate the vars into replays: the single-replay keys, or a `replays` list.

    In the list form, `site`, `endpoint`, `runtime`, `anonymous` and `workers`
    may also stand at the top level as defaults for every entry. Names and
    ports must differ between the replays of one node.
    """
    if not isinstance(settings, dict):
        raise ConfigError("vars", settings, "must be a mapping of settings", "See vars/replay.yml for the keys.")
    if "replays" not in settings:
        return [normalise_replay(settings, layout)]

    replays = []
    for index, item in enumerate(_list_items(settings)):
        try:
            replays.append(normalise_replay(item, layout))
        except ConfigError as error:
            raise ConfigError(f"replays[{index}].{error.field}", error.value, error.problem, error.fix) from None
    _check_unique(replays, "name", "Give every replay its own name.")
    _check_unique(replays, "port", "Give every replay on a node its own port.")
    return replays
