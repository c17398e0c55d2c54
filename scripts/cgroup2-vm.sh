#!/usr/bin/env bash
# Runs the native executor's cgroup tests and the cluster's native end-to-end tests on
# a real cgroup v2 kernel: a qemu guest booting Debian's kernel with a busybox
# initramfs that mounts this machine's root filesystem read-only over 9p, puts a tmpfs
# overlay on it, mounts cgroup2 at /sys/fs/cgroup and runs the already built test
# binaries there (this script again, with --in-guest). The build machines run cgroup v1,
# where these tests take the v1 paths; here they must take the v2 ones
# (AGORA_REQUIRE_CGROUP=v2 turns a skip or a v1 run into a failure).
#
#   scripts/cgroup2-vm.sh            build what is needed, boot, test, print PASS/FAIL/SKIP
#   CGROUP2_VM=0                     skip (prints why)
#   CGROUP2_VM_TESTS=full            also the cli fork bomb, every recovery and
#                                    hostile-task e2e test (give it CGROUP2_VM_TIMEOUT=1800)
#   CGROUP2_VM_TESTS=NAME[,NAME]     only these entries of the list below (e.g. cli-native),
#   CGROUP2_VM_FILTER=WORD           with this libtest filter
#   CGROUP2_VM_EXEC=FILE             run the bash script FILE in the guest first (output
#                                    in exec.out of the logs directory): for debugging
#   CGROUP2_VM_TIMEOUT=SECONDS       the whole VM run, 600 by default
#   CGROUP2_VM_ACCEL=kvm|tcg         force an accelerator (default: kvm when /dev/kvm
#                                    is usable, else tcg software emulation)
#
# Exit status: 0 for PASS and SKIP (qemu or a kernel cannot be had or cannot boot
# here: the reason is printed), 1 for FAIL (a test failed, or the guest ran out of time).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="$root/scripts/cgroup2-vm.sh"

# ---------------------------------------------------------------- inside the guest --
# Runs under the host's own bash, chrooted into the overlay of the host's root, with
# cgroup2 at /sys/fs/cgroup. $2: the results directory (a 9p share of the host's).
if [ "${1:-}" = "--in-guest" ]; then
    results="$2"
    list="$results/tests.list"
    summary="$results/summary"
    : >"$summary"
    # What the tests will see; the host prints it.
    {
        echo "kernel: $(uname -r)"
        echo "accelerator: $(cat "$results/accel" 2>/dev/null || echo unknown)"
        echo "/sys/fs/cgroup: $(awk '$2 == "/sys/fs/cgroup" {print $3}' /proc/mounts)"
        echo "cgroup.controllers: $(cat /sys/fs/cgroup/cgroup.controllers 2>&1)"
        echo "cgroup.subtree_control: $(cat /sys/fs/cgroup/cgroup.subtree_control 2>&1)"
        probe=/sys/fs/cgroup/agora-vm-probe
        mkdir "$probe"
        have=""
        for f in cgroup.kill cgroup.freeze; do [ -e "$probe/$f" ] && have+="$f "; done
        echo "in a child group: $have"
        rmdir "$probe"
        echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
    } >"$results/guest-info"
    export AGORA_REQUIRE_CGROUP=v2 TMPDIR=/tmp HOME=/root RUST_BACKTRACE=1
    threads="$(cat "$results/threads")"
    if [ -s "$results/exec.sh" ]; then
        (cd /tmp && bash "$results/exec.sh") >"$results/exec.out" 2>&1 || true
    fi
    n=0
    while IFS=$'\t' read -r name exe extra; do
        [ -n "$name" ] || continue
        n=$((n + 1))
        out="$results/$name.out"
        start=$(date +%s)
        args=(--test-threads "$threads" --show-output)
        # A filter and --skip options (words without spaces).
        read -r -a more <<<"$extra"
        args+=(${more[@]+"${more[@]}"})
        set +e
        # The test binaries find their crates' files (guests, fixtures) by the
        # absolute paths they were built with, which the overlay keeps.
        (cd "$(dirname "$exe")" && "$exe" "${args[@]}") >"$out" 2>&1
        rc=$?
        set -e
        echo "$name $rc $(($(date +%s) - start))" >>"$summary"
    done <"$list"
    echo "ran $n" >"$results/done"
    exit 0
fi

# ------------------------------------------------------------------- on the host --
skip() {
    echo "cgroup2-vm: SKIP: $*"
    exit 0
}
fail() {
    echo "cgroup2-vm: FAIL: $*"
    exit 1
}
say() { echo "cgroup2-vm: $*"; }

[ "${CGROUP2_VM:-1}" = 0 ] && skip "CGROUP2_VM=0"
[ "$(uname -m)" = x86_64 ] || skip "needs an x86_64 host (this is $(uname -m))"
timeout_s="${CGROUP2_VM_TIMEOUT:-600}"
mode="${CGROUP2_VM_TESTS:-quick}"
t0=$(date +%s)

# 1. qemu, a Debian kernel with 9p modules, a static busybox; installed when missing.
pkgs=()
command -v qemu-system-x86_64 >/dev/null || pkgs+=(qemu-system-x86)
# A static busybox: the init runs before any library can be loaded.
if ! { [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; }; then
    pkgs+=(busybox-static)
fi
# The newest kernel in /boot whose modules include 9p (a Debian kernel package's).
find_kernel() {
    local v best=""
    for k in /boot/vmlinuz-*; do
        [ -e "$k" ] || continue
        v="${k#/boot/vmlinuz-}"
        [ -e "/lib/modules/$v/kernel/fs/9p/9p.ko" ] || [ -e "/lib/modules/$v/kernel/fs/9p/9p.ko.xz" ] || continue
        best="$(printf '%s\n%s\n' "$best" "$v" | sort -V | tail -1)"
    done
    echo "$best"
}
kver="$(find_kernel)"
[ -n "$kver" ] || pkgs+=(linux-image-amd64)
if [ ${#pkgs[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || skip "needs ${pkgs[*]} (not installed) and root to install them"
    command -v apt-get >/dev/null || skip "needs ${pkgs[*]} and apt-get is not here to install them"
    say "installing ${pkgs[*]}"
    t=$(date +%s)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${pkgs[@]}"; } >/tmp/cgroup2-vm-apt.log 2>&1; then
        tail -5 /tmp/cgroup2-vm-apt.log
        skip "apt-get install ${pkgs[*]} failed (log: /tmp/cgroup2-vm-apt.log)"
    fi
    say "installed in $(($(date +%s) - t)) s"
    kver="$(find_kernel)"
    [ -n "$kver" ] || skip "no kernel with 9p modules in /boot after installing linux-image-amd64"
fi
vmlinuz="/boot/vmlinuz-$kver"
[ -r "$vmlinuz" ] || skip "cannot read $vmlinuz (run as root)"

# 2. The test binaries, built once (a no-op after scripts/test.sh's workspace build).
t=$(date +%s)
json="$(mktemp)"
trap 'rm -f "$json" "$json.guests"' EXIT
say "building the test binaries"
(cd "$root" && cargo test --workspace --no-run --message-format=json >"$json") ||
    fail "cargo test --no-run failed: the tests do not build"
# The executable of the test target whose source is $1 (relative to the repo).
exe_of() {
    grep -F "\"src_path\":\"$root/$1\"" "$json" | grep -o '"executable":"[^"]*"' |
        tail -1 | sed 's/^"executable":"//; s/"$//'
}
# The wasm guests some cluster tests run; their tests would otherwise try to build
# them in the guest, which has no toolchain.
(cd "$root" && scripts/build-guests.sh >/dev/null 2>"$json.guests") || {
    cat "$json.guests"
    fail "scripts/build-guests.sh failed"
}
build_s=$(($(date +%s) - t))

# What runs in the guest: name, test target's source, libtest arguments (a filter,
# --skip NAME; none: every test of the binary). The quick list (CI's) leaves out what
# under TCG on a loaded 2-core host ran past the tests' own 120 s bounds: the cli's fork
# bomb (500 forks; the pids limit is checked on v2 by native-executor-tasks) and the
# agent-restart test (a wasm and a native executor re-adopted); and posix isolation,
# which has no cgroup. CGROUP2_VM_TESTS=full runs them.
tests=(
    "native-executor-unit native-executor/src/lib.rs cgroup"
    "native-executor-cgroups native-executor/tests/cgroups.rs"
    "native-executor-tasks native-executor/tests/tasks.rs"
    "native-executor-executor native-executor/tests/executor.rs"
    "cli-native cli/tests/native.rs --skip a_fork_bomb --skip posix_isolation"
)
extra=(
    "cli-recovery-reattach cli/tests/recovery.rs agent_killed_and_restarted_reattaches"
    "cli-recovery cli/tests/recovery.rs"
    "cli-hostile-tasks cli/tests/hostile_tasks.rs"
)
case "$mode" in
quick) ;;
full)
    tests[4]="cli-native cli/tests/native.rs"
    tests+=("${extra[@]:1}")
    ;;
*)
    chosen=()
    for t in "${tests[@]}" "${extra[@]}"; do
        [[ ",$mode," == *",${t%% *},"* ]] && chosen+=("$t")
    done
    [ ${#chosen[@]} -gt 0 ] || [ "$mode" = none ] ||
        fail "CGROUP2_VM_TESTS is quick, full, none or names from: native-executor-unit native-executor-cgroups native-executor-tasks native-executor-executor cli-native cli-recovery-reattach cli-recovery cli-hostile-tasks; not '$mode'"
    tests=("${chosen[@]}")
    ;;
esac
if [ -n "${CGROUP2_VM_FILTER:-}" ]; then
    for i in "${!tests[@]}"; do
        read -r name src _ <<<"${tests[i]}"
        tests[i]="$name $src $CGROUP2_VM_FILTER"
    done
fi

results="$(mktemp -d /tmp/cgroup2-vm.XXXXXX)"
chmod 0755 "$results"
for t in ${tests[@]+"${tests[@]}"}; do
    read -r name src args <<<"$t"
    exe="$(exe_of "$src")"
    if [ -z "$exe" ] || [ ! -x "$exe" ]; then fail "no test binary for $src in cargo's output"; fi
    printf '%s\t%s\t%s\n' "$name" "$exe" "${args:-}" >>"$results/tests.list"
done
: >>"$results/tests.list"
echo 2 >"$results/threads"
if [ -n "${CGROUP2_VM_EXEC:-}" ]; then
    cp "$CGROUP2_VM_EXEC" "$results/exec.sh"  # the guest's /tmp is a tmpfs of its own
fi

# 3. The initramfs: busybox, the kernel's modules for virtio, 9p and overlayfs, /init.
work="$(mktemp -d /tmp/cgroup2-vm-initramfs.XXXXXX)"
mkdir -p "$work"/{bin,dev,proc,sys,modules,host,rw,newroot}
cp /bin/busybox "$work/bin/busybox"
n=0
declare -A seen=()
for m in virtio_pci 9pnet_virtio 9p overlay virtio_rng; do
    while read -r cmd ko _; do
        [ "$cmd" = insmod ] || continue
        [ -z "${seen[$ko]:-}" ] || continue
        seen[$ko]=1
        n=$((n + 1))
        base="$(basename "$ko")"
        case "$ko" in
        *.xz) xz -dc "$ko" >"$work/modules/$(printf %02d "$n")-${base%.xz}" ;;
        *.zst) zstd -qdc "$ko" >"$work/modules/$(printf %02d "$n")-${base%.zst}" ;;
        *) cp "$ko" "$work/modules/$(printf %02d "$n")-$base" ;;
        esac
    done < <(modprobe -S "$kver" --show-depends "$m" 2>/dev/null || true)
done
[ -n "$(ls "$work/modules")" ] || skip "modprobe found no modules for 9p in /lib/modules/$kver (is kmod installed?)"

cat >"$work/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "agora-vm: init started"
for m in /modules/*.ko; do insmod "\$m" || echo "agora-vm: insmod \$m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /host ||
    { echo "agora-vm: cannot mount the host's root over 9p"; poweroff -f; }
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot ||
    { echo "agora-vm: cannot mount the overlay"; poweroff -f; }
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t cgroup2 -o nsdelegate cgroup2 /newroot/sys/fs/cgroup
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
for d in /tmp /run /var/tmp /dev/shm /root; do
    mount -t tmpfs -o mode=1777 tmp /newroot\$d
done
chmod 0700 /newroot/root
# After the tmpfs mounts: the results directory may be under /tmp.
mkdir -p /newroot$results
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 results /newroot$results ||
    { echo "agora-vm: cannot mount the results share"; poweroff -f; }
ip link set lo up
hostname agora-vm
echo "agora-vm: running the tests"
chroot /newroot /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/bash $me --in-guest $results
echo "agora-vm: tests done (\$?)"
sync
poweroff -f
EOF
chmod 0755 "$work/init"
(cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) >"$results/initramfs.cpio.gz"
rm -rf "$work"

# 4. Boot, bounded by the timeout; KVM where /dev/kvm is usable, else TCG.
accel="${CGROUP2_VM_ACCEL:-}"
if [ -z "$accel" ]; then
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then accel=kvm; else accel=tcg; fi
fi
cpus="${CGROUP2_VM_CPUS:-2}"
# Boots with accelerator $1 and waits for qemu to end (the guest powers off), bounded
# by the timeout. Returns early, killing qemu, when the guest's init has not said
# "started" within boot_limit seconds: a nested KVM can hang before the kernel prints
# anything.
boot() {
    local cpu=max boot_limit=${CGROUP2_VM_BOOT_LIMIT:-120} rc=0 qpid now
    [ "$1" = kvm ] && cpu=host
    : >"$results/console.log"
    echo "$1" >"$results/accel"
    # In a subshell whose stderr goes to the log: bash's "Aborted" notice for a qemu
    # that aborts (as qemu 7.2 does on some nested KVMs) lands there too.
    (timeout -k 10 "$timeout_s" qemu-system-x86_64 -accel "$1" -cpu "$cpu" -m 4G -smp "$cpus" \
        -nodefaults -nographic -no-reboot -monitor none -serial "file:$results/console.log" -nic none \
        -kernel "$vmlinuz" -initrd "$results/initramfs.cpio.gz" \
        -append "console=ttyS0 panic=-1 quiet loglevel=4 cgroup_no_v1=all" \
        -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
        -virtfs "local,path=$results,mount_tag=results,security_model=none" \
        -device virtio-rng-pci >"$results/qemu.log" 2>&1; exit $?) 2>>"$results/qemu.log" &
    qpid=$!
    local t_boot
    t_boot=$(date +%s)
    # The guest's first words, or qemu's end, or the boot limit: whichever is first.
    while kill -0 "$qpid" 2>/dev/null; do
        if grep -q "agora-vm: init started" "$results/console.log"; then
            break
        fi
        now=$(date +%s)
        if [ $((now - t_boot)) -ge "$boot_limit" ]; then
            echo "no init after ${boot_limit}s (CGROUP2_VM_BOOT_LIMIT)" >>"$results/qemu.log"
            kill "$qpid" 2>/dev/null || true
            break
        fi
        sleep 1 # polls the console log (no event to wait on); bounded by boot_limit
    done
    wait "$qpid" || rc=$?
    return "$rc"
}
command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 is not installed"
say "booting Linux $kver ($accel, $cpus cpus, timeout ${timeout_s}s; logs in $results)"
# qemu given one accelerator uses it or exits: what boots is what was asked for.
t=$(date +%s)
rc=0
boot "$accel" || rc=$?
if [ "$accel" = kvm ] && ! grep -q "agora-vm: init started" "$results/console.log"; then
    why="$(grep -m1 -i 'error\|assert\|kvm' "$results/qemu.log" || true)"
    say "KVM did not boot the guest (${why:-qemu exit $rc}): trying TCG"
    accel=tcg
    rc=0
    boot tcg || rc=$?
fi
vm_s=$(($(date +%s) - t))
rm -f "$results/initramfs.cpio.gz"

if ! grep -q "agora-vm: init started" "$results/console.log"; then
    tail -20 "$results/qemu.log" "$results/console.log"
    skip "qemu could not boot Linux $kver here (exit $rc; logs in $results)"
fi
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    tail -40 "$results/console.log"
    for f in "$results"/*.out; do [ -e "$f" ] && { echo "== $f (tail)"; tail -30 "$f"; }; done
    fail "the guest ran past ${timeout_s}s (CGROUP2_VM_TIMEOUT); logs in $results"
fi
if [ ! -e "$results/done" ]; then
    tail -40 "$results/console.log"
    fail "the guest stopped before its tests finished (qemu exit $rc); logs in $results"
fi

# 5. What the guest found.
echo "---- guest: $(tr '\n' ';' <"$results/guest-info" | sed 's/;$//; s/;/; /g')"
failed=0
passed_tests=0
failed_tests=0
while read -r name rc secs; do
    echo "---- $name: exit $rc in ${secs}s"
    cat "$results/$name.out"
    # "test result: ok. 4 passed; 0 failed; 0 ignored; ..."
    read -r p f < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$results/$name.out")
    passed_tests=$((passed_tests + p))
    failed_tests=$((failed_tests + f))
    [ "$rc" = 0 ] || failed=$((failed + 1))
done <"$results/summary"
echo "---- cgroup versions the tests used:"
grep -ho 'cgroup v[12]: .*' "$results"/*.out | sort | uniq -c | sed 's/^/  /' || echo "  (none printed)"
line="$passed_tests passed, $failed_tests failed; cargo ${build_s}s, VM ${vm_s}s ($accel), total $(($(date +%s) - t0))s; logs in $results"
[ "$passed_tests" -gt 0 ] || [ "$mode" = none ] || fail "no test ran in the guest: $line"
[ "$failed" = 0 ] || fail "$failed of $(wc -l <"$results/summary") test binaries failed on cgroup v2: $line"
say "PASS: native cgroup tests on cgroup v2 (Linux $kver): $line"
