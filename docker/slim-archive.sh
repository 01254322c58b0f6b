#!/bin/sh
# Writes the slim image's model folder: handler + model-config, no weights.
#
# Usage: docker/slim-archive.sh MODEL_CONFIG OUT_DIR
#
# The handler loads the checkpoint from $LLM_MODEL_DIR or $AIP_STORAGE_URI at
# start (handler.model.sources.weights_dir), so the archive needs none. It is a
# no-archive folder named "llm": the supervisor registers it under $APP.
set -eu
config="$1"
out="$2"
staging="$(mktemp -d)"
cp -r handler "$staging/handler"
find "$staging" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$out"
torch-model-archiver --model-name llm --version 1.0 \
  --handler handler/torchserve_handler.py \
  --extra-files "$staging" \
  --config-file "$config" \
  --export-path "$out" --archive-format no-archive --force
rm -rf "$staging"
