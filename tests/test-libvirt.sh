#!/bin/bash
# Debian's libvirt as shipped (libvirtd + virtlogd, qemu:///system, the
# default /etc/libvirt/qemu.conf: DAC labelling on, remember_owner on) boots
# a guest whose root disk is MNT/disk, mounted with -o allow_other only, from
# a domain XML with no seclabel. While it runs and after it shuts down, no
# user but the owner (and root) can read or write MNT/disk; the guest's
# writes are in the overlay. Issue #17.
#
# The daemons run as root in private mount, network and PID namespaces:
# tmpfs over /run, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt,
# so nothing of the host's libvirt state is touched, and whatever is left
# running dies with the namespace. The guest is tests/guest/build-guest.sh's,
# cached in $SFS_GUEST_DIR (/var/tmp/streamfs-guest). Packages: ./setup.sh.
# About 45 s with the guest cached (its first build: 25 s more), so it runs
# in make check.
G=${SFS_GUEST_DIR:-/var/tmp/streamfs-guest}
if [ -z "${SFS_LIBVIRT_NS:-}" ]; then
	[ "$(id -u)" -eq 0 ] || { echo "SKIP: test-libvirt: needs root" >&2; exit 77; }
	command -v unshare >/dev/null || { echo "FAIL: test-libvirt: needs unshare" >&2; exit 1; }
	# The guest first: its kernel may have to be downloaded, and the
	# namespace has no network.
	start=$(date +%s)
	"$(dirname "$0")/guest/build-guest.sh" "$G" || { echo "FAIL: test-libvirt: guest build" >&2; exit 1; }
	echo "  test-libvirt: guest ready in $(($(date +%s) - start)) s" >&2
	SFS_LIBVIRT_NS=1 exec unshare --mount --net --pid --fork --mount-proc --propagation private \
		bash "$0" "$@"
fi
. "$(dirname "$0")/functions.sh"

# A missing tool skips the test, but fails it in CI (which runs setup.sh --libvirt).
need() {
	local c
	for c in "$@"; do
		command -v "$c" >/dev/null 2>&1 && continue
		[ -n "${CI:-}" ] && fail "needs $c (./setup.sh)"
		skip "needs $c (./setup.sh)"
	done
}
need libvirtd virtlogd virsh qemu-system-x86_64 qemu-img debugfs setpriv fusermount3
id libvirt-qemu >/dev/null 2>&1 || fail "no libvirt-qemu user (libvirt-daemon-system)"
start=$(date +%s)

# Private state for the daemons.
mount -t tmpfs -o mode=755 tmpfs /run
for d in /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do
	mkdir -p "$d"
	mount -t tmpfs -o mode=755 tmpfs "$d"
done
ip link set lo up 2>/dev/null || true

NAME=sfs-test-$RANDOM$RANDOM # $$ is 1 in the PID namespace
URI=qemu:///system
lv_pids=()
lv() { virsh -q -c "$URI" "$@"; }
lv_stop() {
	local p i qpid
	if lv domstate "$NAME" >/dev/null 2>&1; then
		qpid=$(cat "/run/libvirt/qemu/$NAME.pid" 2>/dev/null)
		lv destroy "$NAME" >/dev/null 2>&1
		[ -n "$qpid" ] && kill -9 "$qpid" 2>/dev/null
	fi
	for p in "${lv_pids[@]}"; do
		kill "$p" 2>/dev/null || continue
		for ((i = 0; i < 100; i++)); do
			alive "$p" || break
			sleep 0.05
		done
		alive "$p" && kill -9 "$p"
	done
}
cleanup_fn lv_stop
# libvirt makes a "machine" cgroup on the host (cgroupfs is not namespaced)
# and removes only the domain's own below it: remove it if we made it.
cg_new=()
for d in /sys/fs/cgroup/*/; do
	[ -d "${d}machine" ] || cg_new+=("${d}machine")
done
# shellcheck disable=SC2016 # expanded at exit
cleanup_fn 'for d in "${cg_new[@]}"; do rmdir "$d" 2>/dev/null; done'
# LV_KEEP_LOGS=DIR keeps the daemons' logs and the console.
# shellcheck disable=SC2016 # expanded at exit
cleanup_fn '[ -n "${LV_KEEP_LOGS:-}" ] && cp -r /var/log/libvirt "$LV_KEEP_LOGS" && cp "$T"/*.log "$T"/*.xml "$LV_KEEP_LOGS"/ 2>/dev/null'

# daemon_start NAME CMD...: start a daemon that writes /run/NAME.pid.
daemon_start() {
	local n=$1 i
	shift
	"$@" || fail "$n did not start"
	for ((i = 0; i < 200; i++)); do
		[ -s "/run/$n.pid" ] && break
		sleep 0.05
	done
	[ -s "/run/$n.pid" ] || fail "$n wrote no pid file"
	lv_pids+=("$(cat "/run/$n.pid")")
}
daemon_start virtlogd virtlogd -d -p /run/virtlogd.pid
if [ -n "${LV_STRACE:-}" ]; then
	# LV_STRACE=FILE: what libvirtd and its children do to files.
	strace -f -qq -o "$LV_STRACE" -e trace=%file,%desc,fchown,chown,lchown,fchmod,chmod \
		libvirtd -p /run/libvirtd.pid 2>"$T/libvirtd.stderr" &
	daemon_start libvirtd true
else
	daemon_start libvirtd libvirtd -d -p /run/libvirtd.pid
fi
for ((i = 0; i < 300; i++)); do
	lv version >/dev/null 2>&1 && break
	sleep 0.1
done
lv version >/dev/null || fail "libvirtd does not answer: $(tail -5 /var/log/libvirt/libvirtd.log 2>/dev/null)"

# The overlay over the guest's raw disk. libvirt-qemu must be able to reach
# the files: $T is 0700 (mktemp). The kernel and initrd are copied, since
# libvirt relabels them too.
chmod 755 "$T"
cp "$G/vmlinuz" "$G/initrd.img" "$T/"
"$STREAMFS" create -f qcow2 -b "$G/disk.raw" -F raw "$T/ov.qcow2" >/dev/null
M=$T/mnt
# LV_OWNER=UID:GID: disk owned by UID:GID (-o uid=,gid=), as if a user had
# mounted it; libvirt must give it back to that owner at shutdown, which it
# can only do by remembering it in trusted.libvirt.security.* xattrs on
# disk. Default 4242:4242; LV_OWNER=root for a plain root mount.
: "${LV_OWNER:=4242:4242}"
[ "$LV_OWNER" = root ] && LV_OWNER=
if [ -n "${LV_OWNER:-}" ]; then
	sfs_mount "$T/ov.qcow2" "$M" -o "allow_other,uid=${LV_OWNER%:*},gid=${LV_OWNER#*:}"
else
	sfs_mount "$T/ov.qcow2" "$M" -o allow_other
fi
owner=$(stat -c '%u:%g' "$M/disk")
# Booted first, checked after: today's failure is the one a user meets first.
info "mounted: disk is $(stat -c '%u:%g %a' "$M/disk")"

# as_user UID CMD: run CMD (sh -c) as UID with no supplementary groups.
as_user() { setpriv --reuid="$1" --regid="$1" --clear-groups sh -c "$2"; }
# private_check WHEN: nobody (65534) and daemon (1) can neither read nor
# write MNT/disk.
private_check() {
	local u before after
	before=$(head -c 4096 "$M/disk" | md5sum)
	for u in 65534 1; do
		as_user "$u" "head -c 16 '$M/disk' >/dev/null" 2>/dev/null &&
			fail "$1: uid $u can read disk ($(stat -c '%u:%g %a' "$M/disk"))"
		as_user "$u" "printf X | dd of='$M/disk' bs=1 seek=1000 conv=notrunc status=none" 2>/dev/null &&
			fail "$1: uid $u can write disk ($(stat -c '%u:%g %a' "$M/disk"))"
	done
	after=$(head -c 4096 "$M/disk" | md5sum)
	# While the guest runs it rewrites its superblock (offset 1024) itself:
	# only a stopped guest's disk must be byte-identical; the refused dd
	# above is the check while it runs.
	[ "$1" != "after shutdown" ] || [ "$before" = "$after" ] ||
		fail "$1: disk changed by another user"
	info "$1: disk is $(stat -c '%u:%g %a' "$M/disk"), unreadable and unwritable by uids 65534 and 1"
}

nonce=n$$$RANDOM
: >"$T/console.log"
cat >"$T/domain.xml" <<EOF
<domain type='qemu'>
  <name>$NAME</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$T/vmlinuz</kernel>
    <initrd>$T/initrd.img</initrd>
    <cmdline>$(cat "$G/cmdline") sfs.nonce=$nonce</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$M/disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='$T/console.log'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
boot=$(date +%s)
out=$(lv create "$T/domain.xml" 2>&1) || fail "virsh create: $out"

# wait_console PATTERN TIMEOUT_S: the guest printed PATTERN.
wait_console() {
	local i
	for ((i = 0; i < $2 * 10; i++)); do
		grep -q "$1" "$T/console.log" && return 0
		lv domstate "$NAME" >/dev/null 2>&1 || break
		sleep 0.1
	done
	grep -q "$1" "$T/console.log" ||
		fail "no '$1' on the console in $2 s: $(tail -5 "$T/console.log")"
}
wait_console STREAMFS-GUEST-READY 300
info "guest ready after $(($(date +%s) - boot)) s"
running=$(stat -c '%u:%g %a' "$M/disk")
qemu_ids="$(id -u libvirt-qemu):$(id -g libvirt-qemu)"
info "while running: disk is $running (libvirt-qemu is $qemu_ids)"
private_check "while running"

wait_console "STREAMFS-GUEST-DONE" 300
for ((i = 0; i < 600; i++)); do
	lv domstate "$NAME" >/dev/null 2>&1 || break
	sleep 0.1
done
lv domstate "$NAME" >/dev/null 2>&1 && fail "domain still running 60 s after the guest powered off"
info "guest ran for $(($(date +%s) - boot)) s"

want=$(cat "$G/data.md5")
grep -q "STREAMFS-GUEST-READ $want" "$T/console.log" ||
	fail "guest read wrong data: $(grep GUEST-READ "$T/console.log")"
grep -q "STREAMFS-GUEST-WROTE $nonce" "$T/console.log" || fail "guest did not write"
after=$(stat -c '%u:%g' "$M/disk")
[ "$after" = "$owner" ] || fail "disk is $after after shutdown, was $owner before boot"
private_check "after shutdown"
got=$(debugfs -R 'cat /written' "$M/disk" 2>/dev/null)
[ "$got" = "$nonce" ] || fail "the guest's /written reads '$got' through disk, not '$nonce'"
cmp -s "$M/disk" "$G/disk.raw" && fail "disk equals the backing after the guest wrote"
sfs_umount "$M"
qcheck "$T/ov.qcow2"
info "done in $(($(date +%s) - start)) s"
echo ok
