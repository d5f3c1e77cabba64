#!/usr/bin/env bash
# Installs the real client libraries that the integration tests drive against the stand-ins and
# the gateway (tests/it/standin_fidelity.rs, tests/it/plex_fidelity.rs): the Python packages
# pinned in requirements.txt (jellyfin-apiclient-python, plexapi) and the npm packages locked in
# package-lock.json. Quiet and idempotent; the tests themselves install nothing. PYTHON=... picks
# the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")"
py="${PYTHON:-python3}"

# pip: already-satisfied pins cost no network. Debian's own Python refuses installs outside a
# virtual environment (PEP 668): allow them there, as this is a throwaway test machine.
pip_args=(install --quiet --disable-pip-version-check -r requirements.txt)
if [ "$(id -u)" -eq 0 ]; then
    pip_args+=(--root-user-action=ignore)
fi
err="$(mktemp)"
trap 'rm -f "$err"' EXIT
if ! "$py" -m pip "${pip_args[@]}" 2>"$err"; then
    if grep -q externally-managed "$err"; then
        "$py" -m pip "${pip_args[@]}" --break-system-packages
    else
        cat "$err" >&2
        exit 1
    fi
fi

if [ ! -d node_modules/@jellyfin/sdk ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --silent
fi
