#!/usr/bin/env bash
# Builds the example WASI guests (guest-examples/src/bin/*) for wasm32-wasip1 into
# target/guests/wasm32-wasip1/release/, the same place the tests' `wasm_path` uses,
# and the wasi:http/proxy component guests (guest-examples/hello-http, fetch-http) for
# wasm32-wasip2 into target/guests/wasm32-wasip2/release/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Idempotent; a rust-toolchain.toml `targets` list does not install it for an
# already-installed toolchain, so do it here.
rustup target add wasm32-wasip1 wasm32-wasip2

cargo build --release --target wasm32-wasip1 -p agora-guest-examples \
    --manifest-path "$root/guest-examples/Cargo.toml" \
    --target-dir "$root/target/guests"

# A crate of its own (not a workspace member): components need wasm32-wasip2 and the
# `wasi` crate, which the host workspace has no use for.
cargo build --release --target wasm32-wasip2 \
    --manifest-path "$root/guest-examples/hello-http/Cargo.toml" \
    --target-dir "$root/target/guests"
cargo build --release --target wasm32-wasip2 \
    --manifest-path "$root/guest-examples/fetch-http/Cargo.toml" \
    --target-dir "$root/target/guests"

out="$root/target/guests/wasm32-wasip1/release"
echo "guest modules in $out:"
ls -1 "$out"/*.wasm
components="$root/target/guests/wasm32-wasip2/release"
echo "guest components in $components:"
ls -1 "$components"/*.wasm
