/* streamfs: unit tests for the failover allocation journal
 * (block/journal.c) and its use by the disk (disk_set_journal,
 * block/disk.c).
 *
 * The journal alone: records come back in order, a flush's mark releases
 * exactly what came before it, a full journal says ENOSPC, and damaged
 * memory (header or records) is refused before anything is applied.
 *
 * With the disk, a server crash is simulated in one process: a disk with
 * a journal takes writes, zeroings and copy-on-read without a flush and is
 * then abandoned (its write-back metadata never reaches the overlay, as when
 * the process is killed); a second disk opened on the same overlay bytes
 * first shows that the writes are really lost without the journal, then
 * replays the journal and must read exactly what the guest was told.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "disk.h"
#include "fetch.h"
#include "image.h"
#include "journal.h"
#include "util.h"

#define TJ_MEM	(1u << 20) /* journal memory in the tests: 1 MiB */
#define TJ_CS	4096u
#define TJ_SIZE (64u * TJ_CS)

static void *tj_map(size_t len)
{
	void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	assert_true(m != MAP_FAILED);
	return m;
}

struct tj_seen {
	unsigned n;
	enum journal_kind kind[16];
	uint64_t off[16], len[16], host[16];
};

static int tj_collect(void *opaque, enum journal_kind kind, uint64_t off, uint64_t len,
		      uint64_t host)
{
	struct tj_seen *s = opaque;

	assert_true(s->n < 16);
	s->kind[s->n] = kind;
	s->off[s->n] = off;
	s->len[s->n] = len;
	s->host[s->n] = host;
	s->n++;
	return 0;
}

static void test_journal_order_mark_release(void **state)
{
	void *m = tj_map(TJ_MEM);
	struct journal *j;
	struct tj_seen s = {0};
	uint64_t mark;

	assert_int_equal(journal_open(m, TJ_MEM, &j), 0);
	assert_int_equal(journal_used(j), 0);
	assert_int_equal(journal_append(j, JOURNAL_MAP, 4096, 65536, 1 << 20), 0);
	assert_int_equal(journal_append(j, JOURNAL_ZERO, 0, 1 << 20, 0), 0);
	mark = journal_mark(j);
	assert_int_equal(journal_append(j, JOURNAL_MAP, 5 << 16, 1 << 16, 3 << 20), 0);
	assert_int_equal(journal_replay(j, tj_collect, &s), 0);
	assert_int_equal(s.n, 3);
	assert_int_equal(s.kind[0], JOURNAL_MAP);
	assert_int_equal(s.off[0], 4096);
	assert_int_equal(s.len[0], 65536);
	assert_int_equal(s.host[0], 1 << 20);
	assert_int_equal(s.kind[1], JOURNAL_ZERO);
	assert_int_equal(s.len[1], 1 << 20);
	assert_int_equal(s.host[2], 3 << 20);

	/* A flush covered the first two: only the third is left. */
	journal_release(j, mark);
	memset(&s, 0, sizeof(s));
	assert_int_equal(journal_replay(j, tj_collect, &s), 0);
	assert_int_equal(s.n, 1);
	assert_int_equal(s.off[0], 5 << 16);
	/* The next process finds the same records in the same memory. */
	journal_close(j);
	assert_int_equal(journal_open(m, TJ_MEM, &j), 0);
	memset(&s, 0, sizeof(s));
	assert_int_equal(journal_replay(j, tj_collect, &s), 0);
	assert_int_equal(s.n, 1);
	/* A flush covering everything empties it, and it starts over at 0. */
	journal_release(j, journal_mark(j));
	assert_int_equal(journal_used(j), 0);
	assert_int_equal(journal_mark(j), 0);
	journal_close(j);
	munmap(m, TJ_MEM);
}

static void test_journal_full_is_enospc(void **state)
{
	void *m = tj_map(TJ_MEM);
	struct journal *j;
	unsigned n = 0;
	int r;

	assert_int_equal(journal_open(m, TJ_MEM, &j), 0);
	while ((r = journal_append(j, JOURNAL_MAP, 0, 4096, 4096)) == 0)
		n++;
	assert_int_equal(r, -ENOSPC);
	assert_int_equal(n, (TJ_MEM - 4096) / 32); /* 32 bytes a record */
	journal_reset(j);
	assert_int_equal(journal_append(j, JOURNAL_ZERO, 0, 1ull << 40, 0), 0);
	journal_close(j);
	munmap(m, TJ_MEM);
}

static int tj_never(void *opaque, enum journal_kind kind, uint64_t off, uint64_t len, uint64_t host)
{
	fail_msg("a damaged journal applied a record");
	return 0;
}

static void test_journal_damage_refused(void **state)
{
	uint8_t *m = tj_map(TJ_MEM);
	struct journal *j;

	assert_int_equal(journal_open(m, TJ_MEM, &j), 0);
	assert_int_equal(journal_append(j, JOURNAL_MAP, 0, 4096, 4096), 0);
	assert_int_equal(journal_append(j, JOURNAL_MAP, 4096, 4096, 8192), 0);
	journal_close(j);
	/* Another size than the one it was made with. */
	assert_int_equal(journal_open(m, TJ_MEM / 2, &j), -EINVAL);
	/* The second record's kind is unknown: nothing applied, not even
	 * the intact first record. */
	m[4096 + 32 + 4] = 9;
	assert_int_equal(journal_open(m, TJ_MEM, &j), 0);
	assert_int_equal(journal_replay(j, tj_never, NULL), -EBADMSG);
	journal_close(j);
	/* A bad header. */
	m[0] ^= 1;
	assert_int_equal(journal_open(m, TJ_MEM, &j), -EINVAL);
	munmap(m, TJ_MEM);
}

/* ---- with the disk ---- */

static struct disk *tj_open(struct journal *j, bool cor)
{
	struct image *top = NULL;
	struct disk *d = NULL;

	assert_int_equal(image_open_chain("mem:ovl", NULL, IMAGE_RDWR, NULL, &top), 0);
	assert_int_equal(disk_new(top, cor, false, &d), 0);
	if (j)
		assert_int_equal(disk_set_journal(d, j), 0);
	return d;
}

static void tj_fill(uint8_t *b, size_t len, uint8_t tag)
{
	for (size_t i = 0; i < len; i++)
		b[i] = (uint8_t)(tag + i * 31 + (i >> 9));
}

/* Guest updates with the model of what the guest must then read. */
static void tj_updates(struct disk *d, uint8_t *model)
{
	uint8_t buf[3 * TJ_CS];

	/* Allocating: whole clusters, a partial cluster (the rest comes from
	 * the backing), then a write into a cluster allocated just before. */
	tj_fill(buf, sizeof(buf), 1);
	assert_int_equal(disk_write(d, buf, 2 * TJ_CS, 4 * TJ_CS), 0);
	memcpy(model + 4 * TJ_CS, buf, 2 * TJ_CS);
	tj_fill(buf, 1000, 2);
	assert_int_equal(disk_write(d, buf, 1000, 10 * TJ_CS + 300), 0);
	memcpy(model + 10 * TJ_CS + 300, buf, 1000);
	tj_fill(buf, 512, 3);
	assert_int_equal(disk_write(d, buf, 512, 4 * TJ_CS + 100), 0);
	memcpy(model + 4 * TJ_CS + 100, buf, 512);
	/* Zeroing, then a write over part of what was zeroed. */
	assert_int_equal(disk_zero(d, 20 * TJ_CS, 4 * TJ_CS), 0);
	memset(model + 20 * TJ_CS, 0, 4 * TJ_CS);
	tj_fill(buf, TJ_CS, 4);
	assert_int_equal(disk_write(d, buf, TJ_CS, 21 * TJ_CS), 0);
	memcpy(model + 21 * TJ_CS, buf, TJ_CS);
	/* Copy-on-read allocates cluster 30; a write then lands in place. */
	assert_int_equal(disk_read(d, buf, 100, 30 * TJ_CS + 50), 0);
	assert_memory_equal(buf, model + 30 * TJ_CS + 50, 100);
	tj_fill(buf, 200, 5);
	assert_int_equal(disk_write(d, buf, 200, 30 * TJ_CS + 1000), 0);
	memcpy(model + 30 * TJ_CS + 1000, buf, 200);
}

static void tj_assert_reads(struct disk *d, const uint8_t *model)
{
	uint8_t *got = malloc(TJ_SIZE);

	assert_non_null(got);
	assert_int_equal(disk_read(d, got, TJ_SIZE, 0), 0);
	assert_memory_equal(got, model, TJ_SIZE);
	free(got);
}

static void test_disk_journal_replays_after_crash(void **state)
{
	const char *fmt = *state;
	struct image_create_opts co = {.size = TJ_SIZE,
				       .cluster_size = TJ_CS,
				       .backing_name = "mem:base",
				       .backing_fmt = "raw"};
	uint8_t *base = malloc(TJ_SIZE), *model = malloc(TJ_SIZE), *got = malloc(TJ_SIZE);
	void *m = tj_map(TJ_MEM);
	struct journal *j;
	struct disk *dead, *blind, *d, *dead2;

	assert_true(base && model && got);
	fetch_mem_reset();
	tj_fill(base, TJ_SIZE, 99);
	memcpy(model, base, TJ_SIZE);
	assert_int_equal(fetch_mem_put("base", base, TJ_SIZE), 0);
	assert_int_equal(image_create("mem:ovl", fmt, &co), 0);

	assert_int_equal(journal_open(m, TJ_MEM, &j), 0);
	dead = tj_open(j, true);
	tj_updates(dead, model);
	assert_true(journal_used(j) > 0);
	tj_assert_reads(dead, model);
	/* "Killed": dead's metadata cache is never written back. */

	/* Without the journal the acknowledged writes are gone (this is why
	 * it exists): the overlay's file shows the backing there. */
	blind = tj_open(NULL, false);
	assert_int_equal(disk_read(blind, got, TJ_SIZE, 0), 0);
	assert_memory_not_equal(got + 4 * TJ_CS, model + 4 * TJ_CS, 2 * TJ_CS);
	assert_memory_equal(got + 4 * TJ_CS, base + 4 * TJ_CS, 2 * TJ_CS);
	assert_memory_equal(got + 30 * TJ_CS + 1000, base + 30 * TJ_CS + 1000, 200);
	disk_close(blind); /* it wrote nothing */

	/* The next server replays and keeps the records until its first
	 * flush; it writes in place into a cluster its replay allocated, and
	 * dies too: the one after replays both servers' records. */
	assert_int_equal(journal_open(m, TJ_MEM, &j), 0);
	d = tj_open(j, true);
	assert_true(atomic_load(&d->stats.journal_replayed) > 0);
	assert_true(journal_used(j) > 0);
	tj_assert_reads(d, model);
	tj_fill(got, 300, 7);
	assert_int_equal(disk_write(d, got, 300, 4 * TJ_CS + 2000), 0);
	memcpy(model + 4 * TJ_CS + 2000, got, 300);
	assert_int_equal(journal_open(m, TJ_MEM, &j), 0);
	dead2 = tj_open(j, true);
	tj_assert_reads(dead2, model);
	assert_int_equal(disk_flush(dead2), 0);
	assert_int_equal(journal_used(j), 0);
	assert_int_equal(disk_close(dead2), 0);

	/* Durable: a plain open (no journal) sees the same bytes. */
	blind = tj_open(NULL, false);
	tj_assert_reads(blind, model);
	disk_close(blind);
	disk_close(dead); /* only now: their stale metadata no longer matters */
	disk_close(d);
	fetch_mem_reset();
	munmap(m, TJ_MEM);
	free(base);
	free(model);
	free(got);
}

/* A journal too small for the writes: the disk flushes instead, and
 * nothing is lost either. */
static void test_disk_journal_full_flushes(void **state)
{
	const char *fmt = *state;
	struct image_create_opts co = {.size = TJ_SIZE, .cluster_size = TJ_CS};
	size_t jlen = 4096 + 3 * 32; /* three allocations */
	uint8_t *model = calloc(1, TJ_SIZE), buf[TJ_CS];
	void *m = tj_map(jlen);
	struct journal *j;
	struct disk *dead, *d;

	assert_non_null(model);
	fetch_mem_reset();
	assert_int_equal(image_create("mem:ovl", fmt, &co), 0);
	assert_int_equal(journal_open(m, jlen, &j), 0);
	dead = tj_open(j, false);
	for (unsigned i = 0; i < 10; i++) {
		tj_fill(buf, TJ_CS, (uint8_t)(i + 10));
		assert_int_equal(disk_write(dead, buf, TJ_CS, (uint64_t)i * 3 * TJ_CS), 0);
		memcpy(model + (size_t)i * 3 * TJ_CS, buf, TJ_CS);
	}
	assert_true(atomic_load(&dead->stats.journal_flushes) >= 2);
	assert_int_equal(journal_open(m, jlen, &j), 0);
	d = tj_open(j, false);
	tj_assert_reads(d, model);
	disk_close(d);
	disk_close(dead);
	fetch_mem_reset();
	munmap(m, jlen);
	free(model);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_journal_order_mark_release),
	    cmocka_unit_test(test_journal_full_is_enospc),
	    cmocka_unit_test(test_journal_damage_refused),
	    cmocka_unit_test_prestate(test_disk_journal_replays_after_crash, "qcow2"),
	    cmocka_unit_test_prestate(test_disk_journal_replays_after_crash, "qed"),
	    cmocka_unit_test_prestate(test_disk_journal_full_flushes, "qcow2"),
	    cmocka_unit_test_prestate(test_disk_journal_full_flushes, "qed"),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
