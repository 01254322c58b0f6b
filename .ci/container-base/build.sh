#!/usr/bin/env bash
# Builds the local stand-in for pytorch/torchserve:0.12.0-cpu (see Dockerfile
# here) and prints its tag. Cached: the tag carries a hash of this recipe, so a
# rerun with an unchanged recipe costs only an image lookup.
#
# Env: CONTAINER_WORK (storage folder, default <repo>/.work/containers).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"

recipe_hash="$(sha256sum < "$here/Dockerfile" | cut -c1-12)"
tag="localhost/torchserve-standin:0.12.0-cpu-$recipe_hash"
debian_tag="localhost/debian-base:bookworm"

if podman image exists "$tag"; then
  echo "$tag"
  exit 0
fi

if ! podman image exists "$debian_tag"; then
  rootfs="$CONTAINER_WORK/rootfs-bookworm"
  rm -rf "$rootfs"
  mirror="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >&2
  cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/"
  rm -f "$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" --numeric-owner -cf - . | podman import - "$debian_tag" >&2
  rm -rf "$rootfs"
fi

buildah bud $BUILDAH_BUILD_OPTS \
  --build-arg DEBIAN_BASE="$debian_tag" \
  --layers -t "$tag" -f "$here/Dockerfile" "$here" >&2
echo "$tag"
