"""Filter that lists the distribution packages a node still lacks, from one dpkg-query call."""

from __future__ import annotations


def mlflow_replay_missing_packages(dpkg_output, packages):
    """Return the names in `packages` that `dpkg-query` does not report as installed, in their order.

    `dpkg_output` is the standard output of
    `dpkg-query --show --showformat='${Package} ${db:Status-Status}\\n' NAME...`:
    one "name status" line per known package. dpkg-query prints nothing for a
    name it has never seen (and exits 1). A removed package that left its
    configuration behind reports "config-files". Both count as missing. An
    architecture suffix ("fuse3:amd64") is ignored.
    """
    installed = set()
    for line in (dpkg_output or "").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1] == "installed":
            installed.add(fields[0].split(":", 1)[0])
    return [name for name in packages if name not in installed]


class FilterModule:
    def filters(self):
        return {"mlflow_replay_missing_packages": mlflow_replay_missing_packages}
