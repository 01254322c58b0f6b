#!/bin/sh
# Prepares models/APP (an HF checkpoint folder) inside the build stage.
#
# Usage: prepare-model.sh APP [remote-only]
#
# remote-only skips apps whose source is a local folder: the Dockerfile runs
# this once on apps/ and handler/ alone, so downloads and the SmolLM2
# conversion stay cached when other files change, and once more after the
# whole context is copied (a no-op for an already prepared folder).
# A Hub token comes from the build secret hf_token and lives only in this step.
set -eu
app="$1"
phase="${2:-all}"
if [ -s /run/secrets/hf_token ]; then
  HF_TOKEN="$(cat /run/secrets/hf_token)"
  export HF_TOKEN
fi
kind="$(python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["source"]["kind"])' "apps/$app/app.yaml")"
if [ "$phase" = remote-only ] && [ "$kind" = local ]; then
  echo "prepare-model: $app comes from a local folder, prepared once the context is copied" >&2
  exit 0
fi
python -m handler.model.sources prepare "apps/$app" "models/$app"
