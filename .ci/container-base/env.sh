# Sourced by build.sh, mk/docker.mk (through `bash -c`) and the container tests:
# one place that says where container storage lives and which flags buildah and
# podman need on a machine with no Docker engine (see
# shared/docs/container-builds.md for why each flag is there).
#
# Env in: CONTAINER_WORK (default <repo>/.work/containers).
# Env out: CONTAINERS_STORAGE_CONF, CONTAINERS_CONF, TMPDIR, BUILDAH_BUILD_OPTS,
# PODMAN_RUN_OPTS.

_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export CONTAINER_WORK="${CONTAINER_WORK:-$_repo/.work/containers}"
mkdir -p "$CONTAINER_WORK/storage" "$CONTAINER_WORK/run" "$CONTAINER_WORK/tmp" "$CONTAINER_WORK/pip" \
  "$CONTAINER_WORK/libpod"

# Every image, layer and container state stays under CONTAINER_WORK, so `rm -rf`
# of it cleans up, and two clones on one machine share nothing (podman's own
# state would otherwise sit in /run/libpod for all of them).
cat > "$CONTAINER_WORK/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$CONTAINER_WORK/storage"
runroot = "$CONTAINER_WORK/run"
CONF
export CONTAINERS_STORAGE_CONF="$CONTAINER_WORK/storage.conf"
cat > "$CONTAINER_WORK/containers.conf" <<CONF
[engine]
tmp_dir = "$CONTAINER_WORK/libpod"
CONF
export CONTAINERS_CONF="$CONTAINER_WORK/containers.conf"
export TMPDIR="$CONTAINER_WORK/tmp"

# pip inside RUN steps must trust the same CA as the host (TLS is intercepted
# here) and find torch in the host's wheel folder.
cp /etc/ssl/certs/ca-certificates.crt "$CONTAINER_WORK/pip/ca-bundle.crt"
{
  echo "[global]"
  echo "cert = /etc/xdg/pip/ca-bundle.crt"
  [ -d /opt/wheels ] && echo "find-links = /opt/wheels"
} > "$CONTAINER_WORK/pip/pip.conf"

# chroot isolation: crun cannot run RUN steps here (cgroups in hybrid mode).
BUILDAH_BUILD_OPTS="--format docker --isolation chroot --volume $CONTAINER_WORK/pip:/etc/xdg/pip:ro"
[ -d /opt/wheels ] && BUILDAH_BUILD_OPTS="$BUILDAH_BUILD_OPTS --volume /opt/wheels:/opt/wheels:ro"
export BUILDAH_BUILD_OPTS
# runc with explicit ulimits: crun and runc's defaults both fail on setrlimit here.
export PODMAN_RUN_OPTS="--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=4096:4096"
unset _repo
