#!/bin/bash
# base= on a three-image chain (template <- intermediate <- overlay): only the
# intermediate's data is pulled, the overlay then points at the template
# (name and format in the header), content identical. Also pause/resume/abort
# transitions and EINVAL for a base outside the chain.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io fusermount3

mkbacking "$T/template.raw" 32
qemu-img create -q -f qcow2 -b "$T/template.raw" -F raw "$T/mid.qcow2"
# The intermediate overrides some clusters with data and some with zeros.
qemu-io -f qcow2 -c "write -P 0x5a 1M 3M" -c "write -z 8M 2M" -c "write -P 0x33 20M 64k" \
	"$T/mid.qcow2" >/dev/null
"$STREAMFS" create -f "$FMT" -b "$T/mid.qcow2" -F qcow2 "$T/ovl" >/dev/null
qemu-img convert -O raw "$T/ovl" "$T/ref.raw"

# -o base= is resolved against the caller's directory (the daemon runs in
# /), and a base outside the chain is refused at mount, not left in syslog.
cd "$T"
mkdir -p mnt
"$STREAMFS" ovl mnt -o stream,base=./nothere.raw 2>"$T/err" && fail "mount with a bad base succeeded"
grep -q "not an image of the backing chain" "$T/err" || fail "bad base message: $(cat "$T/err")"
mountpoint -q mnt && fail "mounted with a bad base"
sfs_mount ovl mnt -o stream,speed=1M,base=./template.raw
cd /
[ "$(field "$T/mnt" base)" = "$T/template.raw" ] || fail "relative base at mount: $(field "$T/mnt" base)"
echo 1 >"$T/mnt/control/abort"
sfs_umount "$T/mnt"

sfs_mount "$T/ovl" "$T/mnt"
if echo "start base=$T/nothere.raw" >"$T/mnt/control/stream" 2>/dev/null; then
	fail "base outside the chain accepted"
fi
if echo "start base=$T/ovl" >"$T/mnt/control/stream" 2>/dev/null; then
	fail "the overlay itself accepted as base"
fi
# pause/resume/abort transitions on a slow job
echo "start base=$T/template.raw speed=1M" >"$T/mnt/control/stream"
[ "$(cat "$T/mnt/control/stream")" = running ] || fail "not running"
echo pause >"$T/mnt/control/stream"
[ "$(cat "$T/mnt/control/stream")" = paused ] || fail "not paused"
p1=$(cat "$T/mnt/control/progress"); sleep 0.5; p2=$(cat "$T/mnt/control/progress")
[ "$p1" = "$p2" ] || fail "progress moved while paused: $p1 / $p2"
if echo pause >"$T/mnt/control/stream" 2>/dev/null; then fail "pause while paused accepted"; fi
echo resume >"$T/mnt/control/stream"
[ "$(cat "$T/mnt/control/stream")" = running ] || fail "not running after resume"
echo 1 >"$T/mnt/control/abort"
[ "$(cat "$T/mnt/control/stream")" = cancelled ] || fail "not cancelled"
[ "$(field "$T/mnt" backing)" = "$T/mid.qcow2" ] || fail "cancel changed the backing"
cmp "$T/mnt/disk" "$T/ref.raw" || fail "content differs after cancel"

echo "start base=$T/template.raw" >"$T/mnt/control/stream"
wait_state "$T/mnt" completed
[ "$(field "$T/mnt" backing)" = "$T/template.raw" ] || fail "backing is $(field "$T/mnt" backing)"
cmp "$T/mnt/disk" "$T/ref.raw" || fail "content differs after rebase"
# Only the intermediate's data was copied (3M + 64k of data), not the template.
copied=$(field "$T/mnt" bytes_copied_by_job)
[ "$copied" -le $((4 * 1024 * 1024)) ] || fail "copied $copied bytes, expected only the intermediate's"

# Starting again with the same base has nothing to do: it completes at once
# from the end (resumed_from = the size), does not rewrite the header and
# posts no backing-changed.
mtime=$(stat -c %y "$T/ovl")
cat "$T/mnt/control/events" >"$T/events" &
EVP=$!
cleanup_fn "kill $EVP 2>/dev/null"
# Events are seen from the open on: wait until the reader holds the file.
for ((i = 0; i < 200; i++)); do
	ls -l "/proc/$EVP/fd" 2>/dev/null | grep -q control/events && break
	sleep 0.05
done
echo "start base=$T/template.raw" >"$T/mnt/control/stream"
wait_state "$T/mnt" completed
for ((i = 0; i < 200; i++)); do grep -q " completed " "$T/events" && break; sleep 0.05; done
grep -q " completed " "$T/events" || fail "no completed event: $(cat "$T/events")"
kill $EVP
wait $EVP 2>/dev/null || true
grep -q "backing-changed" "$T/events" && fail "backing-changed posted again: $(cat "$T/events")"
[ "$(field "$T/mnt" resumed_from)" = "$(field "$T/mnt" length)" ] ||
	fail "resumed_from $(field "$T/mnt" resumed_from), expected the size"
[ "$(stat -c %y "$T/ovl")" = "$mtime" ] || fail "the overlay was rewritten by a no-op job"
sfs_umount "$T/mnt"

info=$(qemu-img info "$T/ovl")
echo "$info" | grep -q "backing file: template.raw\|backing file: $T/template.raw" || fail "header backing: $info"
[ "$FMT" = qed ] || echo "$info" | grep -q "backing file format: raw" || fail "header format: $info"
qcheck "$T/ovl"
mv "$T/mid.qcow2" "$T/mid.gone" # the chain no longer needs it
qemu-img compare -f "$FMT" -F raw "$T/ovl" "$T/ref.raw" || fail "overlay differs after rebase"
echo ok
