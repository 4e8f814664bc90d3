#!/usr/bin/python
"""Record what a complete apply left on a node, and later check that the node still matches."""

from __future__ import annotations

DOCUMENTATION = r"""
module: replay_record
short_description: Record the state that a complete apply left on a node, or check the node against it
description:
  - C(state=recorded) fingerprints every file that matches C(files), runs each of
    C(commands) and stores their output, with C(digest), C(urls) and C(report),
    in a JSON file at C(path) (mode 0600).
  - C(state=checked) reads that file and reports C(converged=true) only when the
    digest is the same, the same files match with the same fingerprints, every
    command prints what it printed then, and every URL responds. Otherwise it
    removes the file, so that only a later complete apply writes it again.
  - Either way it reports no change: the record is bookkeeping, not state that
    a user asked for.
options:
  path: {type: path, required: true, description: the record file}
  state: {type: str, required: true, choices: [recorded, checked]}
  digest: {type: str, required: true, no_log: true, description: digest of the apply's inputs}
  files: {type: list, elements: str, default: [], description: absolute paths or glob patterns}
  commands: {type: list, elements: list, default: [], description: read-only commands, as argument lists}
  urls: {type: list, elements: dict, default: [], description: "C(url) and the C(status) codes that count as a response"}
  report: {type: raw, default: null, description: what the apply reported, handed back by a check}
"""

import glob
import hashlib
import json
import os
import ssl
import stat
import subprocess
import tempfile
import urllib.error
import urllib.request

from ansible.module_utils.basic import AnsibleModule

# Files up to this size are fingerprinted by content. Larger ones (binaries,
# snapshots) are fingerprinted by size, inode and modification time, which
# every rewrite changes.
CONTENT_LIMIT = 1024 * 1024
COMMAND_TIMEOUT = 120
URL_TIMEOUT = 10


def fingerprint(path):
    """Return a string that changes when the file, link or directory at `path` changes."""
    info = os.lstat(path)
    access = f"{stat.S_IMODE(info.st_mode):o} {info.st_uid}:{info.st_gid}"
    if stat.S_ISLNK(info.st_mode):
        return f"link {os.readlink(path)}"
    if stat.S_ISDIR(info.st_mode):
        return f"dir {access}"
    if info.st_size > CONTENT_LIMIT:
        return f"file {access} {info.st_size} {info.st_ino} {info.st_mtime_ns}"
    with open(path, "rb") as handle:
        return f"file {access} {hashlib.sha256(handle.read()).hexdigest()}"


def fingerprint_files(patterns):
    """Return a fingerprint of every path that matches one of `patterns`, with "missing" for a path that vanished meanwhile."""
    found = {}
    for pattern in patterns:
        for path in glob.glob(pattern, recursive=True):
            try:
                found[path] = fingerprint(path)
            except FileNotFoundError:
                found[path] = "missing"
    return found


def run_commands(commands):
    """Return each command's exit code and output, in order."""
    results = []
    for argv in commands:
        try:
            done = subprocess.run([str(part) for part in argv], capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT, check=False)
            results.append([done.returncode, done.stdout])
        except (OSError, subprocess.TimeoutExpired) as error:
            results.append([None, str(error)])
    return results


def unresponsive(urls):
    """Return the URLs that did not respond with one of their status codes."""
    # The guard may serve TLS with a self-signed certificate, and only the status code counts here.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    failed = []
    for entry in urls:
        try:
            with urllib.request.urlopen(entry["url"], timeout=URL_TIMEOUT, context=context) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except (OSError, ValueError):
            status = None
        if status not in entry.get("status", [200]):
            failed.append(entry["url"])
    return failed


def write_record(path, record):
    """Write `record` as JSON, readable by root only, replacing the file in one step."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".record-")
    with os.fdopen(handle, "w", encoding="utf-8") as output:
        json.dump(record, output, sort_keys=True)
    os.replace(temporary, path)


def read_record(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def difference(record, params):
    """Return why the node no longer matches `record`, or None when it does."""
    if record is None:
        return "no record of a complete apply"
    if record.get("digest") != params["digest"]:
        return "the settings, credentials, inventory or code changed since the last complete apply"
    if fingerprint_files(record["files_patterns"]) != record["files"]:
        return "a file that apply manages changed"
    if run_commands(record["commands"]) != record["outputs"]:
        return "a unit, mount, firewall rule or published store changed"
    failed = unresponsive(record["urls"])
    if failed:
        return "no response from " + ", ".join(failed)
    return None


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "state": {"type": "str", "required": True, "choices": ["recorded", "checked"]},
            "digest": {"type": "str", "required": True, "no_log": True},
            "files": {"type": "list", "elements": "str", "default": []},
            "commands": {"type": "list", "elements": "list", "default": []},
            "urls": {"type": "list", "elements": "dict", "default": []},
            "report": {"type": "raw", "default": None},
        },
        supports_check_mode=True,
    )
    params = module.params
    if params["state"] == "recorded":
        if not module.check_mode:
            write_record(params["path"], {
                "digest": params["digest"],
                "files_patterns": params["files"],
                "files": fingerprint_files(params["files"]),
                "commands": params["commands"],
                "outputs": run_commands(params["commands"]),
                "urls": params["urls"],
                "report": params["report"],
            })
        module.exit_json(changed=False)
    record = read_record(params["path"])
    reason = difference(record, params)
    if reason is not None and record is not None and not module.check_mode:
        os.unlink(params["path"])
    module.exit_json(changed=False, converged=reason is None, reason=reason or "",
                     report=record.get("report") if reason is None else None)


if __name__ == "__main__":
    main()
