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
