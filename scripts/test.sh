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
# No unwrap, expect, indexing, panic! or unreachable! outside tests in the shell crates
# (issue 13: no panic on data from outside). Those crates opt in with `[lints]
# workspace = true`, Cargo.toml's [workspace.lints.clippy] denies the lints, so a
# violation fails the run here, before the long tests; clippy's other advice is not
# this run's business (-A clippy::all). Check-only, but the dependencies are checked
# once more (a check's metadata is not the build's): 2.5 min after the build above on
# a fresh target dir (7.5 min with no build before it), 1-7 s when only our code
# changed, on a 2-core machine.
cargo clippy --workspace --all-targets -- -A clippy::all
cargo test --workspace "$@"
# The native cgroup tests again on a cgroup v2 kernel, in a qemu guest (these machines
# run v1): PASS, FAIL (stops the run) or SKIP with the reason where qemu cannot run.
# Reuses the build above; 82 s to 4 min under TCG, plus 1 min of apt the first time.
# CGROUP2_VM=0 to skip.
bash scripts/cgroup2-vm.sh
# Fuzzing (fuzz/): each of 8 targets for 30 s, two at a time, after one build of its
# own (it links agora-agent for http_door and agora-fn-gateway for master_http_door:
# about 24 min cold on a 2-core machine loaded by other builds, 36 s warm; runs 125 s);
# FUZZ_SECONDS=N for longer, 0 to skip.
if [ "${FUZZ_SECONDS:-30}" != 0 ]; then
    FUZZ_JOBS="${FUZZ_JOBS:-2}" scripts/fuzz.sh "${FUZZ_SECONDS:-30}"
fi
