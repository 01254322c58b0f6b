"""Copy a model folder from Cloud Storage to local disk (the slim image's weights).

Vertex copies a Model's ``artifact_uri`` into its own bucket and passes it as
``AIP_STORAGE_URI``; the handler calls this once at start-up. The Cloud
Storage client is imported inside the function so that the handler package
imports (and its unit tests run) without google-cloud-storage installed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """Split ``gs://bucket/some/prefix`` into the bucket and a ``/``-terminated prefix.

    The trailing slash keeps ``gs://b/smollm2`` from also matching ``smollm2-old/``.
    """
    if not uri.startswith("gs://"):
        raise ValueError(f"not a Cloud Storage URI: {uri!r} (expected gs://bucket/prefix)")
    bucket, _, prefix = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def download_gcs_prefix(uri: str, dest: Path) -> Path:
    """Copy every object under ``uri`` into ``dest``, keeping the relative layout.

    Credentials come from the environment: the replica's service account on
    Vertex, none when ``STORAGE_EMULATOR_HOST`` points at an emulator. Each file
    is written under a temporary name and renamed, so a restart after a crash
    never mistakes a truncated shard for a complete one.
    """
    from google.cloud import storage  # type: ignore[attr-defined]

    bucket_name, prefix = parse_gs_uri(uri)
    root = Path(dest).resolve()
    root.mkdir(parents=True, exist_ok=True)
    client = storage.Client()
    copied = 0
    total_bytes = 0
    for blob in client.list_blobs(bucket_name, prefix=prefix):
        if blob.name.endswith("/"):
            continue  # folder placeholders made by the console hold no data
        target = (root / blob.name[len(prefix) :]).resolve()
        if root not in target.parents:
            raise ValueError(f"object {blob.name!r} would be written outside {root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        blob.download_to_filename(str(partial))
        os.replace(partial, target)
        copied += 1
        total_bytes += blob.size or 0
    if copied == 0:
        raise FileNotFoundError(f"no objects under {uri}")
    log.info("copied %d files (%d bytes) from %s to %s", copied, total_bytes, uri, root)
    return root
