#!/usr/bin/env bash
# Vendor uPlot (the charts of the operator HMI, docs/hmi.md) into
# linectl/web/static/vendor/ from the npm package, at a pinned version.
#
#   bash scripts/vendor_uplot.sh
#
# The operator PCs are offline: the HMI loads nothing from a CDN, so the chart library is
# committed. This script fetches the package tarball with `npm pack` (the npm registry
# only; no install, no lifecycle script runs), checks the tarball against the registry's
# integrity hash pinned below, copies the minified IIFE build, its CSS and the LICENSE
# (verbatim), writes vendor/README.md with the sha256 of each vendored file and prints
# them. Run it again after changing UPLOT_VERSION (and UPLOT_INTEGRITY: `npm view
# uplot@<version> dist.integrity`), then review and commit the vendor/ folder.
set -euo pipefail

UPLOT_VERSION=1.6.32
UPLOT_INTEGRITY="sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=linectl/web/static/vendor
TMP=$(mktemp -d "${TMPDIR:-/tmp}/vendor-uplot.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

(cd "$TMP" && npm pack --silent "uplot@${UPLOT_VERSION}" >/dev/null)
TARBALL="$TMP/uplot-${UPLOT_VERSION}.tgz"
got="sha512-$(openssl dgst -sha512 -binary "$TARBALL" | base64 -w0)"
if [ "$got" != "$UPLOT_INTEGRITY" ]; then
    echo "vendor_uplot: uplot-${UPLOT_VERSION}.tgz integrity $got, expected $UPLOT_INTEGRITY" >&2
    exit 1
fi
tar -xzf "$TARBALL" -C "$TMP"

mkdir -p "$DEST"
cp "$TMP/package/dist/uPlot.iife.min.js" "$DEST/uPlot.iife.min.js"
cp "$TMP/package/dist/uPlot.min.css" "$DEST/uPlot.min.css"
cp "$TMP/package/LICENSE" "$DEST/LICENSE"

FILES=(uPlot.iife.min.js uPlot.min.css LICENSE)
{
    echo "# Vendored: uPlot ${UPLOT_VERSION}"
    echo
    echo "The charts of the operator HMI ([docs/hmi.md](../../../../docs/hmi.md)) use"
    echo "[uPlot](https://github.com/leeoniya/uPlot), MIT licence (\`LICENSE\` here, verbatim"
    echo "from the package). The operator PCs are offline, so it is committed here and"
    echo "served by linectl itself under \`/static/vendor/\`; nothing is fetched at run time."
    echo
    echo "- npm package: \`uplot\`, version \`${UPLOT_VERSION}\`"
    echo "- tarball integrity (checked by the script): \`${UPLOT_INTEGRITY}\`"
    echo "- files, copied unchanged from the package (\`dist/\` and the package root):"
    echo
    echo "| file | from | sha256 |"
    echo "|---|---|---|"
    for f in "${FILES[@]}"; do
        case "$f" in LICENSE) from="package/LICENSE" ;; *) from="package/dist/$f" ;; esac
        echo "| \`$f\` | \`$from\` | \`$(sha256sum "$DEST/$f" | cut -d' ' -f1)\` |"
    done
    echo
    echo "Vendored (and re-vendored, e.g. for another version) by:"
    echo
    echo '```'
    echo "bash scripts/vendor_uplot.sh"
    echo '```'
    echo
    echo "which runs \`npm pack uplot@${UPLOT_VERSION}\` in a temporary folder, checks the"
    echo "tarball's integrity, extracts it, copies the three files here, rewrites this README"
    echo "and prints the sha256 of each file. Do not edit the vendored files by hand."
} >"$DEST/README.md"

echo "uplot ${UPLOT_VERSION} vendored into $DEST:"
(cd "$DEST" && sha256sum "${FILES[@]}")
