#!/bin/sh
# The container image the command plugin tests run: Debian's python3 with numpy and pydicom, built
# here from Debian packages through apt's configured sources (mmdebstrap), imported with podman.
# Nothing is pulled from a container registry. Takes about half a minute; run it as root.
#
#   tests/data/containers/build.sh            # builds localhost/dicom-node-test-python:1 if missing
#   tests/data/containers/build.sh --force    # rebuilds it
set -eu
IMAGE=localhost/dicom-node-test-python:1
HERE=$(cd "$(dirname "$0")" && pwd)
# This machine's container settings for the tests (see containers.conf).
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/containers.conf}"

need=""
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || need="$need $tool"
done
if [ -n "$need" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y $need
fi
if [ "${1:-}" != "--force" ] && podman image exists "$IMAGE"; then
    echo "$IMAGE is there"
    exit 0
fi
. /etc/os-release
SOURCES=/etc/apt/sources.list
[ -f /etc/apt/sources.list.d/debian.sources ] && SOURCES=/etc/apt/sources.list.d/debian.sources
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mmdebstrap --quiet --variant=essential --include=python3-numpy,python3-pydicom \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$VERSION_CODENAME" "$TMP/rootfs.tar" "$SOURCES"
podman import --change 'CMD ["/bin/sh"]' "$TMP/rootfs.tar" "$IMAGE" >/dev/null
podman run --rm --network=none "$IMAGE" python3 -c "import numpy, pydicom; print('built $IMAGE: numpy', numpy.__version__, 'pydicom', pydicom.__version__)"
