#!/usr/bin/env bash
# Install what the demo and the tests need on a Debian or Ubuntu host, as
# root: the test bench's system packages and a Python virtualenv in .venv.
# Safe to rerun: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd-container and mmdebstrap boot the throwaway test nodes, iptables
# gives them NAT to the package archives, rclone publishes the sample store,
# iproute2 builds the bench network.
packages=(systemd-container mmdebstrap iptables rclone fuse3 iproute2 openssh-client chromium)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
if ! cmp -s requirements-test.txt .venv/.installed-requirements 2>/dev/null \
    || ! cmp -s requirements.txt .venv/.installed-base 2>/dev/null; then
    echo "setup: installing Python packages into .venv (a few minutes the first time)"
    .venv/bin/pip install --quiet -r requirements-test.txt
    cp requirements-test.txt .venv/.installed-requirements
    cp requirements.txt .venv/.installed-base
fi
