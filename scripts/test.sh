#!/usr/bin/env bash
# Install everything the tests need (Debian packages and Python packages) and run them.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/bin/storescu ] || need_apt+=(dcmtk)
[ -x /usr/sbin/Orthanc ] || need_apt+=(orthanc)
# Orthanc's DICOMweb plugin: a DICOMweb client of the node and a STOW-RS destination in the tests.
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || need_apt+=(dicom3tools)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
# The scale-out compose file's DICOM load balancer is run by tests/e2e/test_docker_files.py.
[ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
# The dashboard's browser tests drive Debian's Chromium with Playwright (no browser download).
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
# Container plugins are tested with podman (runc: see tests/data/containers/containers.conf) on an image
# built here from Debian's packages with mmdebstrap; nothing is pulled from a container registry.
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    # Orthanc's and PostgreSQL's packages may start system services; the tests start their own.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e ./sdk -e '.[test]'
if [ "$(id -u)" -eq 0 ]; then
    sh tests/data/containers/build.sh || echo "could not build the container plugin tests' image: they will fail" >&2
fi

set +e
python3 -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: the test tree is broken" >&2
    exit 1
fi
exit "$rc"
