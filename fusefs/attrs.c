/* streamfs: the attributes of /disk across crash failover.
 *
 * Owner, mode, ctime and the user./trusted. extended attributes of /disk
 * live in the server's memory (fusefs/ops.c). libvirt sets them while a
 * guest runs (DAC labelling: chown to the QEMU user, the original owner in
 * trusted.libvirt.security.*), so a server that died and came back with
 * the mount options' defaults would lock the running QEMU out of reopening
 * its disk and make libvirt restore the wrong owner at shutdown. So a
 * failover server also keeps a copy in memory shared with the supervisor
 * (a memfd it creates, like the write journal's), rewritten at every
 * change, and a new server starts from it.
 *
 * LAYOUT: a header and two slots. A change is serialised into the slot not
 * in use, then one atomic store of the header's active word (slot + 1)
 * makes it current: a server killed while writing leaves the previous
 * copy whole. A slot: struct sfs_attrs_slot, then per attribute its name
 * length, value length, name and value. The reader checks every length
 * against the slot (the memory outlives servers of other versions, and is
 * treated as untrusted input).
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fusefs.h"
#include "util.h"

#define SFS_ATTRS_MAGIC 0x5254544153465331ull /* "1SFSATTR" little-endian */
#define SFS_ATTRS_SLOT	((SFS_ATTRS_SHM_SIZE - 4096) / 2)

struct sfs_attrs_hdr {
	uint64_t magic;
	_Atomic uint64_t active; /* 0: nothing saved; 1 or 2: that slot */
};

struct sfs_attrs_slot {
	uint32_t uid, gid, mode, nxattrs;
	int64_t ctime;
	uint64_t bytes; /* of the attribute entries that follow */
};

static uint8_t *sfs_attrs_slot(void *shm, unsigned i)
{
	return (uint8_t *)shm + 4096 + (size_t)i * SFS_ATTRS_SLOT;
}

void sfs_attrs_save(struct sfs_mount *m)
{
	struct sfs_attrs_hdr *h = m->attrs_shm;
	unsigned next;
	uint8_t *p, *q;
	struct sfs_attrs_slot sl;

	if (!h)
		return;
	next = atomic_load(&h->active) == 1 ? 1 : 0;
	p = sfs_attrs_slot(h, next);
	q = p + sizeof(sl);
	sl = (struct sfs_attrs_slot){.uid = m->disk_uid,
				     .gid = m->disk_gid,
				     .mode = m->disk_mode,
				     .nxattrs = m->disk_nxattrs,
				     .ctime = m->disk_ctime};
	for (unsigned i = 0; i < m->disk_nxattrs; i++) {
		const struct sfs_xattr *x = &m->disk_xattrs[i];
		uint32_t len[2] = {(uint32_t)strlen(x->name), (uint32_t)x->size};

		/* Bounded by SFS_XATTR_MAX(_BYTES), which the slot holds. */
		memcpy(q, len, sizeof(len));
		memcpy(q + sizeof(len), x->name, len[0]);
		memcpy(q + sizeof(len) + len[0], x->value, len[1]);
		q += sizeof(len) + len[0] + len[1];
	}
	sl.bytes = (uint64_t)(q - p - sizeof(sl));
	memcpy(p, &sl, sizeof(sl));
	atomic_store_explicit(&h->active, next + 1, memory_order_release);
}

/* Parse slot p into m's attributes; -EBADMSG if it does not hold up. */
static int sfs_attrs_parse(struct sfs_mount *m, const uint8_t *p)
{
	struct sfs_attrs_slot sl;
	struct sfs_xattr *xs;
	const uint8_t *q, *end;
	size_t total = 0;

	memcpy(&sl, p, sizeof(sl));
	if (sl.nxattrs > SFS_XATTR_MAX || sl.bytes > SFS_ATTRS_SLOT - sizeof(sl) || sl.mode > 07777)
		return -EBADMSG;
	xs = calloc(SFS_XATTR_MAX, sizeof(*xs));
	if (!xs)
		return -ENOMEM;
	q = p + sizeof(sl);
	end = q + sl.bytes;
	for (unsigned i = 0; i < sl.nxattrs; i++) {
		uint32_t len[2];

		if ((size_t)(end - q) < sizeof(len))
			goto bad;
		memcpy(len, q, sizeof(len));
		q += sizeof(len);
		if (len[0] == 0 || len[0] > 255 || len[1] > SFS_XATTR_MAX_BYTES ||
		    (size_t)(end - q) < (size_t)len[0] + len[1])
			goto bad;
		xs[i].name = strndup((const char *)q, len[0]);
		xs[i].value = malloc(len[1] ? len[1] : 1);
		if (!xs[i].name || !xs[i].value || strlen(xs[i].name) != len[0])
			goto bad;
		memcpy(xs[i].value, q + len[0], len[1]);
		xs[i].size = len[1];
		total += len[0] + len[1];
		q += len[0] + len[1];
	}
	if (total > SFS_XATTR_MAX_BYTES)
		goto bad;
	m->disk_uid = sl.uid;
	m->disk_gid = sl.gid;
	m->disk_mode = sl.mode;
	m->disk_ctime = (time_t)sl.ctime;
	m->disk_xattrs = xs;
	m->disk_nxattrs = sl.nxattrs;
	m->disk_xattr_bytes = total;
	return 0;
bad:
	for (unsigned i = 0; i < SFS_XATTR_MAX; i++) {
		free(xs[i].name);
		free(xs[i].value);
	}
	free(xs);
	return -EBADMSG;
}

int sfs_attrs_attach(struct sfs_mount *m, void *shm, size_t len)
{
	struct sfs_attrs_hdr *h = shm;
	uint64_t a;
	int r = 0;

	if (len < SFS_ATTRS_SHM_SIZE)
		return -EINVAL;
	if (h->magic == 0 && atomic_load(&h->active) == 0) {
		h->magic = SFS_ATTRS_MAGIC; /* a new memfd: zeros */
	} else if (h->magic != SFS_ATTRS_MAGIC) {
		return -EINVAL;
	} else {
		a = atomic_load_explicit(&h->active, memory_order_acquire);
		if (a == 1 || a == 2)
			r = sfs_attrs_parse(m, sfs_attrs_slot(h, (unsigned)a - 1));
		else if (a != 0)
			r = -EBADMSG;
	}
	if (r < 0)
		return r;
	m->attrs_shm = shm;
	return 0;
}
