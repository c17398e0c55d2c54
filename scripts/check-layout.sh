#!/usr/bin/env bash
# The architecture rules of ARCHITECTURE.md that the compiler cannot see by itself:
# the pure crates depend on nothing that does I/O and read no clock, the master
# and the agent do not link the WebAssembly runtime, and the shell crates take the
# no-panic lints. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

fail=0
# Crates that must never do I/O: no async runtime, socket, disk or clock.
pure=(agora-proto agora-allocator agora-master-core agora-agent-core)
forbidden='^(tokio|quinn|quinn-proto|rustls|redb|hyper|hyper-util|axum|mio|socket2|wasmtime|cgroups-rs|libc) v'
for c in "${pure[@]}"; do
    bad=$(cargo tree -q -p "$c" -e normal --prefix none | grep -E "$forbidden" | sort -u || true)
    if [ -n "$bad" ]; then
        echo "layout: $c must stay pure, but depends on:" >&2
        echo "$bad" | sed 's/^/  /' >&2
        fail=1
    fi
done
# Nor may their sources reach the disk, the network or a clock through std.
for d in proto/src core/allocator/src core/master/src core/agent/src; do
    bad=$(grep -rnE 'std::(fs|net|process|thread)\b|Instant::now|SystemTime::now|std::env::var' "$d" || true)
    if [ -n "$bad" ]; then
        echo "layout: $d is pure (time comes in as a parameter), but:" >&2
        echo "$bad" | sed 's/^/  /' >&2
        fail=1
    fi
done
# The master and the agent route functions; they never run them.
for c in agora-master agora-agent agora-fn-gateway agora-fn-api agora-executor-link; do
    if cargo tree -q -p "$c" -e normal -i wasmtime >/dev/null 2>&1; then
        echo "layout: $c links wasmtime:" >&2
        cargo tree -q -p "$c" -e normal -i wasmtime | head -20 | sed 's/^/  /' >&2
        fail=1
    fi
done
# One error type per library crate (thiserror); anyhow belongs to binaries only, so it
# may appear under [dev-dependencies] (tests, examples) but not [dependencies].
anyhow_ok=(cli/Cargo.toml)
for toml in */Cargo.toml */*/Cargo.toml; do
    [[ " ${anyhow_ok[*]} " == *" $toml "* ]] && continue
    if awk '/^\[/{sect=$0} sect=="[dependencies]" && /^anyhow[ .=]/{found=1} END{exit !found}' "$toml"; then
        echo "layout: $toml lists anyhow under [dependencies]; a library crate returns its own error type (thiserror)" >&2
        fail=1
    fi
done
# The shells read the network, task output and the disk: each takes the workspace's
# no-panic lints (unwrap, expect, indexing, panic!, unreachable!), which test.sh's
# clippy step enforces; a crate that dropped its `[lints]` would pass it unseen.
shells=(net master agent executor-link wasm-executor native-executor functions/runtime
    functions/host functions/gateway functions/api http-forward sdk cli)
for d in "${shells[@]}"; do
    if ! awk '/^\[/{sect=$0} sect=="[lints]" && /^workspace *= *true/{found=1} END{exit !found}' "$d/Cargo.toml"; then
        echo "layout: $d/Cargo.toml lacks [lints] workspace = true (the shells' no-panic lints)" >&2
        fail=1
    fi
done
if [ "$fail" = 0 ]; then
    echo "layout: pure crates (${pure[*]}) depend on no I/O crate and read no clock;"
    echo "layout: master, agent, the functions gateway, fn-api and executor-link do not link wasmtime"
    echo "layout: no library crate depends on anyhow"
    echo "layout: the shell crates take the no-panic lints ([lints] workspace = true)"
fi
exit "$fail"
