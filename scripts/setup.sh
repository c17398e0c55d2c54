#!/usr/bin/env bash
# Everything a fresh machine needs before building Agora: the wasm32-wasip1 target
# for the example guests. Idempotent and quiet when all is in place.
set -euo pipefail
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    echo "setup: installing the wasm32-wasip1 Rust target" >&2
    rustup target add wasm32-wasip1
fi
