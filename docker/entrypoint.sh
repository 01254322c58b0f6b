#!/bin/sh
# Container entrypoint, run by tini. `serve` (the default CMD) starts TorchServe
# and the gateway under one supervisor (python -m gateway); any other command
# runs instead, for debugging: `docker run --rm -it IMAGE bash`.
set -eu
if [ "$#" -eq 0 ] || [ "$1" = "serve" ]; then
  exec python -m gateway
fi
exec "$@"
