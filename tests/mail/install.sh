#!/usr/bin/env bash
# Installs the real SMTP server that the mail tests start (tests/mail/smtpd.py, driven by
# tests/it/smtpd.rs): PyPI aiosmtpd and its dependencies, pinned in requirements.txt, into
# target/tools/aiosmtpd (on PYTHONPATH for the server only; the system's Python is not touched).
# Quiet and idempotent: nothing happens while the installed copy matches requirements.txt.
# PYTHON=... picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
py="${PYTHON:-python3}"
dest=target/tools/aiosmtpd
stamp="$dest/.requirements.txt"

if [ -f "$stamp" ] && cmp -s tests/mail/requirements.txt "$stamp"; then
    exit 0
fi
rm -rf "$dest"
pip_args=(install --quiet --disable-pip-version-check --no-warn-script-location
    --target "$dest" -r tests/mail/requirements.txt)
if [ "$(id -u)" -eq 0 ]; then
    pip_args+=(--root-user-action=ignore)
fi
"$py" -m pip "${pip_args[@]}"
cp tests/mail/requirements.txt "$stamp"
