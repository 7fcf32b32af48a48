#!/usr/bin/env bash
# Put noVNC (the npm package pinned in controlplane/package.json and package-lock.json) into
# the control plane's static files, where the web UI's viewer imports it:
#   src/streamspace_controlplane/static/vendor/novnc/{core,vendor,LICENSE.txt}
# The copy is git-ignored and never committed; hatchling puts it into wheels (it is listed
# under `artifacts` in pyproject.toml). Run by `./dev up` and `./dev test`; safe to re-run:
# it does nothing when the copy matches the lock file.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=$here/src/streamspace_controlplane/static/vendor/novnc
stamp=$dest/.package-lock.json

if [ -f "$dest/core/rfb.js" ] && cmp -s "$here/package-lock.json" "$stamp"; then
    exit 0
fi
if ! command -v npm >/dev/null; then
    echo "error: npm is needed to fetch noVNC for the web UI's viewer;" \
        "install it (Debian: apt-get install nodejs npm) and run $0 again" >&2
    exit 1
fi
echo "fetching noVNC with npm ci into $dest" >&2
(cd "$here" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
src=$here/node_modules/@novnc/novnc
rm -rf "$dest"
mkdir -p "$dest"
cp -R "$src/core" "$src/vendor" "$dest/"
cp "$src/LICENSE.txt" "$src/package.json" "$dest/"
cp "$here/package-lock.json" "$stamp"
