#!/bin/bash
# disk is private: mode 0600 owned by the mounting user unless -o uid=,gid=,
# mode= say otherwise; chown and chmod on it work as on a file (what
# libvirt's DAC labelling does) and last for the life of the mount; the
# kernel enforces them for other users with allow_other; control files are
# writable by the owner only. Needs root (su to another user).
. "$(dirname "$0")/functions.sh"
requires qemu-img su
[ "$(id -u)" -eq 0 ] || skip "needs root to act as another user"
id nobody >/dev/null 2>&1 || fail "no user 'nobody'"

randfile "$T/base.raw" 4
"$STREAMFS" create -f qcow2 -b "$T/base.raw" -F raw "$T/ov.qcow2" >/dev/null
chmod 0755 "$T" # let nobody reach the mountpoint
M=$T/mnt

# as_nobody CMD: run a shell command as user nobody.
as_nobody() { su nobody -s /bin/sh -c "$1" 2>/dev/null; }
attrs() { stat -c '%u:%g %a' "$1"; }

# 1. Defaults, with allow_other: root-owned 0600; nobody can neither read
#    nor write disk, nor write any control file; status stays readable.
sfs_mount "$T/ov.qcow2" "$M" -o allow_other
[ "$(attrs "$M/disk")" = "0:0 600" ] || fail "default disk attrs: $(attrs "$M/disk")"
as_nobody "head -c 16 '$M/disk' >/dev/null" && fail "nobody read a 0600 disk"
as_nobody "printf x | dd of='$M/disk' conv=notrunc status=none" && fail "nobody wrote disk"
for f in "$M"/control/*; do
	mode=$(stat -c %a "$f")
	[ $((0$mode & 022)) -eq 0 ] || fail "$f is writable by others ($mode)"
done
as_nobody "echo pause > '$M/control/stream'" && fail "nobody wrote control/stream"
as_nobody "cat '$M/control/status' >/dev/null" || fail "status not readable with allow_other"

# 2. chown/chmod as libvirt does: then only the new owner may open it.
chown nobody:nogroup "$M/disk" || fail "chown disk"
[ "$(attrs "$M/disk")" = "$(id -u nobody):$(getent group nogroup | cut -d: -f3) 600" ] ||
	fail "after chown: $(attrs "$M/disk")"
n=$(as_nobody "head -c 4096 '$M/disk' | wc -c") || true
[ "$n" = 4096 ] || fail "owner nobody could not read disk ($n)"
cmp -n 4096 "$M/disk" "$T/base.raw" || fail "bytes differ"
as_nobody "chmod 0640 '$M/disk'" || fail "owner could not chmod"
[ "$(stat -c %a "$M/disk")" = 640 ] || fail "mode after chmod: $(stat -c %a "$M/disk")"
as_nobody "chown 0 '$M/disk'" && fail "unprivileged chown succeeded"
chmod 0600 "$M/disk"
chown 0:0 "$M/disk"
as_nobody "head -c 1 '$M/disk' >/dev/null" && fail "nobody still reads after chown back"
chown nobody "$M/control/status" 2>/dev/null && fail "chown of a control file succeeded"
sfs_umount "$M"

# 3. A remount starts from the options again (nothing is persisted).
sfs_mount "$T/ov.qcow2" "$M" -o allow_other,uid=nobody,gid=nogroup,mode=0640
[ "$(attrs "$M/disk")" = "$(id -u nobody):$(getent group nogroup | cut -d: -f3) 640" ] ||
	fail "-o uid,gid,mode: $(attrs "$M/disk")"
as_nobody "head -c 1 '$M/disk' >/dev/null" || fail "uid=nobody cannot read"
sfs_umount "$M"

# 4. Without allow_other nobody can open anything, whatever the mode.
sfs_mount "$T/ov.qcow2" "$M" -o mode=0666
as_nobody "head -c 1 '$M/disk' >/dev/null" && fail "nobody read without allow_other"
sfs_umount "$M"

# 5. Bad options are refused before mounting.
"$STREAMFS" "$T/ov.qcow2" "$M" -o uid=no-such-user-here 2>"$T/err" && fail "unknown user accepted"
grep -q "unknown user" "$T/err" || fail "message: $(cat "$T/err")"
"$STREAMFS" "$T/ov.qcow2" "$M" -o mode=0999 2>"$T/err" && fail "mode 0999 accepted"
mountpoint -q "$M" && fail "mounted despite a bad option"
qcheck "$T/ov.qcow2"
echo "PASS: $TESTNAME"
