"""Time HTTP requests from inside a node (stdlib only; copied to the node and run there).

Input on stdin, one JSON object: {"base": URL, "requests": [{"name", "method",
"path", "body"}], "repetitions": N, "timeout": seconds, "skip_after_timeout": bool}.
Output on stdout, one JSON object: {name: [seconds or null for a timeout, ...]}.
Requests run one at a time in the given order, repetition after repetition.
A request that fails with another error stops the script with exit code 1.
"""

import json
import sys
import time
import urllib.error
import urllib.request


def timed_request(base, request, timeout):
    """Return the seconds until the whole response body arrived, or None on a timeout."""
    body = request.get("body")
    data = json.dumps(body).encode() if body is not None else None
    prepared = urllib.request.Request(
        base + request["path"], data=data, method=request["method"],
        headers={"Content-Type": "application/json"} if data else {},
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(prepared, timeout=timeout) as response:
            response.read()
    except (TimeoutError, urllib.error.URLError) as error:
        if isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError):
            return None
        raise
    return time.perf_counter() - started


def main():
    spec = json.load(sys.stdin)
    timings = {request["name"]: [] for request in spec["requests"]}
    timed_out = set()
    for _ in range(spec["repetitions"]):
        for request in spec["requests"]:
            name = request["name"]
            if name in timed_out and spec.get("skip_after_timeout"):
                continue
            seconds = timed_request(spec["base"], request, spec["timeout"])
            if seconds is None:
                timed_out.add(name)
            timings[name].append(seconds)
    json.dump(timings, sys.stdout)


if __name__ == "__main__":
    main()
