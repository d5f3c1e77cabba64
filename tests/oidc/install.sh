#!/usr/bin/env bash
# Installs the OpenID provider the single sign-on tests start (tests/it/oidc.rs): panva's
# certified `oidc-provider`, locked in package-lock.json. Quiet and idempotent.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d node_modules/oidc-provider ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --silent
fi
