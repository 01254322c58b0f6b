#!/bin/sh
# Creates /opt/venv on a Python 3.11 (pyproject.toml: >=3.10,<3.12, and
# transformers 5.23 needs >=3.11).
#
# Why: pytorch/torchserve:0.12.0-{cpu,gpu} ship Python 3.9 on Ubuntu 20.04,
# too old for this stack. uv (from PyPI) finds a fitting interpreter when the
# base has one (the CI stand-in has 3.11), or installs a standalone CPython into
# /opt/python, which the runtime stage copies next to the venv. Either way
# /opt/venv is the one environment the image runs.
#
# Env: UV_VERSION (pinned by the Dockerfile), PYTHON_WANT, PYTHON_VERSION.
set -eu
want="${PYTHON_WANT:->=3.11,<3.12}"
version="${PYTHON_VERSION:-3.11}"
export UV_PYTHON_INSTALL_DIR=/opt/python
mkdir -p /opt/python

python3 -m pip install --no-cache-dir --target /tmp/uv "uv==${UV_VERSION}"
uv=/tmp/uv/bin/uv
if py="$("$uv" python find --no-python-downloads --python-preference only-system "$want")"; then
  echo "provision-python: using the base image's $py" >&2
else
  echo "provision-python: no Python $want in the base, installing CPython $version into /opt/python" >&2
  "$uv" python install "$version"
  py="$("$uv" python find --python-preference only-managed "$version")"
fi
"$py" -m venv /opt/venv
rm -rf /tmp/uv
