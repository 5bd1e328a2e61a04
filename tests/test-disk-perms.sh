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

# 3. Extended attributes of disk (libvirt's remember_owner keeps the
#    original owner in trusted.libvirt.security.*): kept in memory, with
#    the usual errors; security.* is not supported.
python3 - "$M/disk" <<'PY' || fail "xattrs on disk"
import errno, os, sys
d = sys.argv[1]
def err(f, *a):
    try:
        f(*a)
    except OSError as e:
        return e.errno
    return 0
assert os.listxattr(d) == [], os.listxattr(d)
assert err(os.getxattr, d, "trusted.libvirt.security.dac") == errno.ENODATA
os.setxattr(d, "trusted.libvirt.security.dac", b"+0:+0")
os.setxattr(d, "user.note", b"x" * 100)
assert os.getxattr(d, "trusted.libvirt.security.dac") == b"+0:+0"
assert sorted(os.listxattr(d)) == ["trusted.libvirt.security.dac", "user.note"]
assert err(os.setxattr, d, "user.note", b"y", os.XATTR_CREATE) == errno.EEXIST
assert err(os.setxattr, d, "user.other", b"y", os.XATTR_REPLACE) == errno.ENODATA
os.setxattr(d, "user.note", b"short", os.XATTR_REPLACE)
assert os.getxattr(d, "user.note") == b"short"
assert err(os.setxattr, d, "security.selinux", b"x") == errno.EOPNOTSUPP
os.removexattr(d, "user.note")
assert err(os.removexattr, d, "user.note") == errno.ENODATA
# bounded: many large values end in ENOSPC, never unbounded memory
n = 0
while err(os.setxattr, d, "user.big%d" % n, b"z" * 60000) == 0:
    n += 1
    assert n < 100, "no bound on xattr memory"
for i in range(n):
    os.removexattr(d, "user.big%d" % i)
assert os.listxattr(d) == ["trusted.libvirt.security.dac"]
PY
as_nobody "python3 -c 'import os; os.getxattr(\"$M/disk\", \"trusted.libvirt.security.dac\")'" &&
	fail "nobody read a trusted.* xattr"
sfs_umount "$M"

# 4. A remount starts from the options again (nothing is persisted).
sfs_mount "$T/ov.qcow2" "$M" -o allow_other,uid=nobody,gid=nogroup,mode=0640
[ "$(attrs "$M/disk")" = "$(id -u nobody):$(getent group nogroup | cut -d: -f3) 640" ] ||
	fail "-o uid,gid,mode: $(attrs "$M/disk")"
as_nobody "head -c 1 '$M/disk' >/dev/null" || fail "uid=nobody cannot read"
sfs_umount "$M"

# 5. Without allow_other nobody can open anything, whatever the mode.
sfs_mount "$T/ov.qcow2" "$M" -o mode=0666
as_nobody "head -c 1 '$M/disk' >/dev/null" && fail "nobody read without allow_other"
sfs_umount "$M"

# 6. Bad options are refused before mounting.
"$STREAMFS" "$T/ov.qcow2" "$M" -o uid=no-such-user-here 2>"$T/err" && fail "unknown user accepted"
grep -q "unknown user" "$T/err" || fail "message: $(cat "$T/err")"
"$STREAMFS" "$T/ov.qcow2" "$M" -o mode=0999 2>"$T/err" && fail "mode 0999 accepted"
mountpoint -q "$M" && fail "mounted despite a bad option"
qcheck "$T/ov.qcow2"
echo "PASS: $TESTNAME"
