#!/usr/bin/env bash
# Builds CI's equivalent of the Dockerfile's default base (python:3.11-slim-bookworm,
# which no registry here can serve) and prints its tag: Debian 12 bookworm,
# debootstrapped from the machine's own mirror and brought up to date from
# bookworm-security, with Debian's Python 3.11, the same extra packages
# (ca-certificates, netbase, tzdata), the same dpkg path excludes as Debian's
# slim images, LANG=C.UTF-8 and CMD python3. What still differs from the real
# base is in docs/docker.md ("The base image").
#
# Cached: the tag carries a hash of this script, so a rerun with an unchanged
# recipe costs only an image lookup.
#
# Env: CONTAINER_WORK (storage folder, default <repo>/.work/containers).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"

recipe_hash="$(cat "$here/build.sh" "$here/dpkg-slim.cfg" | sha256sum | cut -c1-12)"
tag="localhost/python-debian:3.11-bookworm-$recipe_hash"

if podman image exists "$tag"; then
  echo "$tag"
  exit 0
fi

rootfs="$CONTAINER_WORK/rootfs-bookworm"
# debootstrap can leave the target's /proc mounted: never delete through a mount.
remove_rootfs() {
  local mnt
  for mnt in dev/pts dev sys proc; do
    if mountpoint -q "$rootfs/$mnt"; then umount -l "$rootfs/$mnt"; fi
  done
  rm -rf --one-file-system "$rootfs"
}
trap remove_rootfs EXIT
remove_rootfs
mirror="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
# python3.11-venv: ensurepip, built into python:3.11-slim's Python. debootstrap
# resolves neither virtual nor `:any` dependencies, hence python3-distutils
# (python3.11-distutils) and python3 named here.
debootstrap --variant=minbase --include=ca-certificates,netbase,tzdata,python3.11,python3.11-venv,python3-distutils,python3 \
  bookworm "$rootfs" "$mirror" >&2

# Debian's slim images drop docs, man pages and locales, and keep dropping them
# for every later apt-get install; the Dockerfile must cope (man1 for Java).
cp "$here/dpkg-slim.cfg" "$rootfs/etc/dpkg/dpkg.cfg.d/docker"
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/{man,groff,info,linda,lintian/overrides}/* "$rootfs/usr/share/locale"/*/

# The base's security updates: debootstrap installs bookworm's point release only.
cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/"
rm -f "$rootfs/etc/apt/sources.list"
# A clean env: env.sh's TMPDIR does not exist inside the chroot.
in_root() { chroot "$rootfs" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
in_root apt-get update -qq >&2
in_root apt-get -y -qq upgrade >&2
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar -C "$rootfs" --numeric-owner -cf - . \
  | podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$tag" >&2
echo "$tag"
