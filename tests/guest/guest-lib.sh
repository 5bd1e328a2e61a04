# Sourced by build-guest.sh and build-bootbench.sh: what their guests share.
# A Debian kernel for direct kernel boot and a busybox initramfs that loads
# virtio_pci/virtio_blk/ext4 and switch_roots to root= (mounted read-only if
# "ro" is on the command line). The caller sets NAME (for messages), OUT
# (the output directory), FILES (what it writes there) and EXTRA_INPUTS
# (more lines for the cache key), then runs:
#   guest_start     sets $inputs; exits 0 if OUT already holds FILES built
#                   from the same inputs; else makes the work dir $w
#   guest_kernel    $w/vmlinuz and the modules, from the .deb
#   guest_initrd    $w/initrd.img
#   guest_finish    moves FILES from $w to OUT and records the inputs
# Root is needed only to install busybox-static or e2fsprogs; apt-get update
# is tried (as root) once if the lists name a kernel the mirror no longer has.

guest_need() {
	local c
	for c in apt-get apt-cache dpkg dpkg-deb cpio gzip mkfs.ext4 md5sum "$@"; do
		command -v "$c" >/dev/null || { echo "$NAME: needs $c" >&2; exit 1; }
	done
	dpkg -s busybox-static >/dev/null 2>&1 || { echo "$NAME: needs busybox-static" >&2; exit 1; }
}

# The kernel: the package that linux-image-amd64 depends on today.
guest_kernel_pkg() {
	kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
		awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
	[ -n "$kpkg" ] || { echo "$NAME: no linux-image-amd64 in apt's lists (apt-get update?)" >&2; exit 1; }
	kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')
	inputs="script $(cat "$0" "${BASH_SOURCE[0]}" | md5sum | cut -c1-32)
kernel $kpkg $kver
busybox $(md5sum </bin/busybox | cut -c1-32)${EXTRA_INPUTS:+
$EXTRA_INPUTS}"
}

guest_start() {
	local f ok=1
	guest_kernel_pkg
	mkdir -p "$OUT"
	OUT=$(cd "$OUT" && pwd)
	if [ -f "$OUT/inputs" ] && [ "$(cat "$OUT/inputs")" = "$inputs" ]; then
		for f in $FILES; do [ -s "$OUT/$f" ] || ok=0; done
		[ $ok = 1 ] && exit 0
	fi
	rm -f "$OUT/inputs"
	w=$(mktemp -d "$OUT/work.XXXXXX")
	trap 'rm -rf "$w"' EXIT
}

guest_kernel() {
	# apt-get download writes to the current directory; as root it warns
	# that _apt cannot write there unless the directory is world-writable.
	chmod 777 "$w"
	# Stale lists name a .deb the mirror no longer has: update them once.
	if ! (cd "$w" && apt-get download -q "$kpkg=$kver" >"$w/apt.log" 2>&1); then
		if [ "$(id -u)" -ne 0 ] || ! apt-get update -qq >/dev/null 2>&1; then
			cat "$w/apt.log" >&2
			exit 1
		fi
		guest_kernel_pkg
		(cd "$w" && apt-get download -q "$kpkg=$kver" >"$w/apt.log" 2>&1) ||
			{ cat "$w/apt.log" >&2; exit 1; }
	fi
	mkdir "$w/k"
	dpkg-deb --fsys-tarfile "$w"/"$kpkg"_*.deb |
		tar -x -C "$w/k" --wildcards './boot/vmlinuz-*' './lib/modules/*.ko'
	rm -f "$w"/*.deb
	cp "$w"/k/boot/vmlinuz-* "$w/vmlinuz"
}

# Modules with their dependencies (from each .ko's .modinfo "depends="),
# dependencies first. crc32c_generic: ext4's checksums need crc32c, a soft
# dependency that modinfo's depends= does not list.
guest_initrd() {
	local kdir m p a
	declare -A seen=()
	local order=()
	kdir=$(echo "$w"/k/lib/modules/*)
	addmod() {
		local m=$1 p d
		m=${m//-/_}
		[ -n "${seen[$m]:-}" ] && return 0
		seen[$m]=1
		p=$(find "$kdir" -name "$m.ko" -print -quit)
		[ -n "$p" ] || { echo "$NAME: module $m not in $kpkg" >&2; exit 1; }
		for d in $(tr '\0' '\n' <"$p" | sed -n 's/^depends=//p' | tr ',' ' '); do
			addmod "$d"
		done
		order+=("$p")
	}
	for m in virtio_pci virtio_blk crc32c_generic ext4; do addmod "$m"; done

	# initramfs: load the modules, mount root= (read-only for "ro"), switch
	# to its /sbin/init.
	local ir=$w/initramfs
	mkdir -p "$ir"/{bin,dev,proc,sys,newroot,modules}
	cp /bin/busybox "$ir/bin/busybox"
	for a in sh mount umount insmod switch_root sleep sed cat echo; do ln -s busybox "$ir/bin/$a"; done
	: >"$ir/modules/order"
	for p in "${order[@]}"; do
		cp "$p" "$ir/modules/"
		basename "$p" >>"$ir/modules/order"
	done
	cat >"$ir/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/modules/$m" || echo "initramfs: insmod $m failed"; done </modules/order
root=/dev/vda opt=rw
for a in $(cat /proc/cmdline); do
	case $a in
	root=*) root=${a#root=} ;;
	ro) opt=ro ;;
	esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 -o "$opt" "$root" /newroot || { echo "initramfs: cannot mount $root"; exec sh; }
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
INIT
	chmod 755 "$ir/init"
	(cd "$ir" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 >"$w/initrd.img"
}

guest_finish() {
	local f
	for f in $FILES; do
		mv -f "$w/$f" "$OUT/$f"
		chmod 644 "$OUT/$f"
	done
	echo "$inputs" >"$OUT/inputs"
}
