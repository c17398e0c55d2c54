#!/usr/bin/env bash
# Fuzzes what Agora reads from outside (fuzz/, cargo-fuzz with libFuzzer), each
# target for a bounded time: scripts/fuzz.sh [SECONDS_PER_TARGET] (default 30).
#
#   FUZZ_TARGETS="decode frame"  only these targets (default: all of fuzz/fuzz_targets)
#   FUZZ_JOBS=2                  run this many targets at once (default 1)
#
# Builds on the stable toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z
# flags), without a sanitizer (the code under test is safe Rust; panics, overflow
# checks and debug assertions are on) into fuzz/target. Each target starts from its
# seed corpus (fuzz/corpus/TARGET) copied to a temporary directory, so the
# repository is not written to; the inputs of fuzz/regressions/TARGET are replayed
# first. A crash, a hang (10 s per input) or 2 GiB of memory fails the run; the
# input is kept in fuzz/artifacts/TARGET/ and printed in base64.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
secs="${1:-30}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]" >&2
    exit 2
fi
jobs="${FUZZ_JOBS:-1}"
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_PROGRESS_WHEN=never

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cd fuzz/fuzz_targets && ls ./*.rs | sed 's|^\./||; s|\.rs$||' | tr '\n' ' ')}"
start=$(date +%s)
echo "fuzz: building ${targets}"
cargo fuzz build -O -a -s none
built=$(date +%s)
echo "fuzz: built in $((built - start)) s"
bin_dir="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# One target: replay its regressions, then fuzz for $secs from a copy of its seeds.
# Writes its executions to $work/TARGET.execs; returns non-zero on a failure.
run_target() {
    local t="$1" bin="$bin_dir/$1" corpus="$work/$1/corpus" log="$work/$1/log"
    local artifacts="$root/fuzz/artifacts/$t/"
    mkdir -p "$corpus" "$artifacts"
    if [ -d "fuzz/corpus/$t" ]; then
        cp -r "fuzz/corpus/$t/." "$corpus/"
    fi
    if [ -d "fuzz/regressions/$t" ] && [ -n "$(ls -A "fuzz/regressions/$t")" ]; then
        if ! "$bin" -rss_limit_mb=2048 -timeout=10 "fuzz/regressions/$t"/* >"$log.regressions" 2>&1; then
            tail -n 40 "$log.regressions"
            echo "fuzz: $t FAILED on an input of fuzz/regressions/$t"
            return 1
        fi
    fi
    local rc=0
    timeout --kill-after=10 $((secs + 120)) "$bin" "$corpus" \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 -artifact_prefix="$artifacts" >"$log" 2>&1 || rc=$?
    local execs
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    echo "${execs:-0}" >"$work/$t.execs"
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$log"
        for f in $(grep -o "Test unit written to [^ ]*" "$log" | sed 's/Test unit written to //'); do
            echo "fuzz: $t input $f (base64): $(base64 -w0 "$f")"
        done
        echo "fuzz: $t FAILED (exit $rc) after ${execs:-?} executions"
        return 1
    fi
    echo "fuzz: $t ok: ${execs:-?} executions in ${secs} s ($(ls "$corpus" | wc -l) corpus inputs)"
}

failed=()
pids=()
names=()
for t in $targets; do
    if [ ! -x "$bin_dir/$t" ]; then
        echo "fuzz: no target $t in $bin_dir" >&2
        exit 2
    fi
    run_target "$t" &
    pids+=($!)
    names+=("$t")
    if [ "${#pids[@]}" -ge "$jobs" ]; then
        wait "${pids[0]}" || failed+=("${names[0]}")
        pids=("${pids[@]:1}")
        names=("${names[@]:1}")
    fi
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${names[$i]}")
done

total=0
echo "fuzz: executions per target (${secs} s each):"
for t in $targets; do
    n=$(cat "$work/$t.execs" 2>/dev/null || echo 0)
    printf '  %-17s %12d\n' "$t" "$n"
    total=$((total + n))
done
printf '  %-17s %12d\n' total "$total"
echo "fuzz: build $((built - start)) s, runs $(($(date +%s) - built)) s"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}" >&2
    exit 1
fi
