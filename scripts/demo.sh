#!/usr/bin/env bash
# The demo: starts a dev cluster (one master, one agent) and runs a few example
# guests through it with `agora run`, then shows `agora ps --all` and stops.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/build-guests.sh >/dev/null
cargo build -p agora-cli
# Where cargo put it (CARGO_TARGET_DIR, if set, moves it).
agora="${CARGO_TARGET_DIR:-$root/target}/debug/agora"
guests="$root/target/guests/wasm32-wasip1/release"

data="$(mktemp -d)"
log="$data/dev.log"
"$agora" dev --data-dir "$data" >"$log" 2>&1 &
dev_pid=$!
trap 'kill $dev_pid 2>/dev/null; wait $dev_pid 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 1 300); do
    grep -qx ready "$log" && break
    kill -0 $dev_pid 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done
grep -qx ready "$log" || { echo "the dev cluster did not start:"; cat "$log"; exit 1; }
sed -n '/agora dev cluster is up/,/ready/p' "$log" | grep -v '^ready$'
export AGORA_CONFIG="$data/client.json"

step() { printf '\n\033[1m$ agora %s\033[0m\n' "$*"; }
step run --env GREETING=hi hello.wasm -- from the demo
"$agora" run --env GREETING=hi "$guests/hello.wasm" -- from the demo
step run fib.wasm -- 30
"$agora" run "$guests/fib.wasm" -- 30
printf 'the quick brown fox\njumps over the lazy dog\n' >"$data/input.txt"
step run --input input.txt files.wasm
"$agora" run --input "$data/input.txt" "$guests/files.wasm"
step run exit-code.wasm -- 3
"$agora" run "$guests/exit-code.wasm" -- 3 || echo "(exit code $?)"
step run --fuel 5000000 spin.wasm
"$agora" run --fuel 5000000 "$guests/spin.wasm" || echo "(exit code $?)"
step run --mem 32MiB memhog.wasm
"$agora" run --mem 32MiB "$guests/memhog.wasm" | tail -n 1 || true
step ps --all
"$agora" ps --all
step agents
"$agora" agents
step bench launch -n 200 --use-config
"$agora" bench launch -n 200 --use-config

# Functions: a CGI-style module and a wasi:http component, called over HTTP.
http_url="$(sed -n 's/^ *http  *\(http:\/\/[^ ]*\).*/\1/p' "$log" | head -n 1)"
step fn deploy echo echo.wasm --timeout 5s
"$agora" fn deploy echo "$guests/echo.wasm" --timeout 5s
step fn deploy hello hello_http.wasm
"$agora" fn deploy hello "$root/target/guests/wasm32-wasip2/release/hello_http.wasm"
if [ -n "$http_url" ] && command -v curl >/dev/null 2>&1; then
    printf '\n\033[1m$ curl %s/fn/echo/any/path?x=1 -d "a body"\033[0m\n' "$http_url"
    curl -sS --max-time 60 "$http_url/fn/echo/any/path?x=1" -d "a body"
    printf '\n\033[1m$ curl %s/fn/hello/\033[0m\n' "$http_url"
    curl -sS --max-time 60 "$http_url/fn/hello/"
    echo
else
    echo "(no curl or no HTTP address: skipping the calls)"
fi
step fn ls
"$agora" fn ls
step fn logs echo
"$agora" fn logs echo
step "fn tenant set '*' --max-concurrency 64"
"$agora" fn tenant set '*' --max-concurrency 64
