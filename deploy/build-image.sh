#!/usr/bin/env bash
# Build the serving image on a machine that cannot pull registry images: a Debian 12 base made from
# Debian's packages (debootstrap, minbase), imported into podman, then deploy/Containerfile on it.
#   sudo deploy/build-image.sh [TAG]              # default tag imagerec-serve:dev
#   WHEELS_DIR=/opt/wheels sudo -E deploy/build-image.sh   # torch's CPU wheel from a local directory
#   BUILD_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt ...   # pip behind an intercepting HTTPS proxy
#   ISOLATION=chroot ...                           # where podman cannot run an OCI runtime (nested sandboxes)
# Needs root, podman and debootstrap (Debian packages of the same names).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-imagerec-serve:dev}
base=localhost/imagerec-base-bookworm:minbase
if ! podman image exists "$base"; then
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase bookworm "$rootfs"
  tar -C "$rootfs" -c . | podman import - "$base"
fi
extra=()
if [ -n "${WHEELS_DIR:-}" ]; then
  extra=(--volume "$WHEELS_DIR:$WHEELS_DIR:ro" --build-arg "WHEELS_DIR=$WHEELS_DIR" --build-arg TORCH_CPU_INDEX=)
fi
if [ -n "${BUILD_CA_BUNDLE:-}" ]; then  # HTTPS through an intercepting proxy: pip trusts this bundle
  extra+=(--volume "$BUILD_CA_BUNDLE:/etc/imagerec-build-ca.pem:ro" --build-arg BUILD_CA_BUNDLE=/etc/imagerec-build-ca.pem)
fi
podman build --isolation "${ISOLATION:-oci}" --network=host --build-arg "BASE=$base" "${extra[@]}" -f deploy/Containerfile -t "$tag" .
