#!/usr/bin/env bash
# Everything a fresh machine needs before building Agora: the wasm32-wasip1 target
# for the example guests (build-guests.sh adds wasm32-wasip2 for the component),
# clippy for test.sh's no-panic lints, and curl for the demo's function calls.
# Idempotent and quiet when all is in place.
set -euo pipefail
if ! cargo clippy --version >/dev/null 2>&1; then
    echo "setup: installing clippy" >&2
    rustup component add clippy
fi
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    echo "setup: installing the wasm32-wasip1 Rust target" >&2
    rustup target add wasm32-wasip1
fi
if ! command -v curl >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing curl (Debian package)" >&2
    apt-get install -y -qq curl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq curl; }
fi
