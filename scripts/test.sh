#!/usr/bin/env bash
# Runs every test: unit tests of the cores, executor tests on real guests, and the
# end-to-end and conformance tests against real `agora dev` clusters.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
# The architecture's dependency rules (ARCHITECTURE.md), before anything slow.
scripts/check-layout.sh
# Guests once per run, then one build of the workspace that every test reuses.
scripts/build-guests.sh >/dev/null
cargo build --workspace --all-targets
cargo test --workspace "$@"
