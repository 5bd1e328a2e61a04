/* streamfs test helper: build crash images from a write trace.
 *
 *   replay INITIAL TRACE OUTDIR SEED MAX
 *
 * TRACE is what the daemon recorded with STREAMFS_TRACE=FILE (fetch/fetch.c):
 * every overlay write ('W' off len data), fdatasync ('F') and truncate ('T'
 * size), in completion order. A crash at any moment between flush k-1 and
 * flush k leaves on disk: everything up to flush k-1, plus any subset of the
 * writes issued after it (the page cache may have written back some, in any
 * order). For up to MAX cut points (flushes, sampled evenly, plus the end)
 * this writes OUTDIR/crash-NNNN = INITIAL + records up to flush k-1 + a
 * seeded random subset of the records between flush k-1 and flush k.
 * The test then checks each image with qemu-img and the data verifier.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct rec {
	char kind;
	uint64_t a;
	uint32_t len;
	long data; /* offset of the data in the trace file */
};

static int apply(FILE *img, FILE *tr, const struct rec *r)
{
	static char buf[1 << 20];
	uint32_t done = 0;

	if (r->kind == 'T')
		return ftruncate(fileno(img), (off_t)r->a);
	if (r->kind != 'W')
		return 0;
	while (done < r->len) {
		uint32_t n = r->len - done < sizeof(buf) ? r->len - done : (uint32_t)sizeof(buf);
		if (fseek(tr, r->data + done, SEEK_SET) || fread(buf, 1, n, tr) != n)
			return -1;
		if (fseeko(img, (off_t)(r->a + done), SEEK_SET) || fwrite(buf, 1, n, img) != n)
			return -1;
		done += n;
	}
	return 0;
}

int main(int argc, char **argv)
{
	FILE *tr, *init;
	struct rec *v = NULL;
	size_t n = 0, cap = 0, nflush = 0, *flushes = NULL;
	unsigned seed, max, made = 0;
	char path[4096];

	if (argc != 6)
		return fprintf(stderr, "usage: replay INITIAL TRACE OUTDIR SEED MAX\n"), 2;
	seed = (unsigned)strtoul(argv[4], NULL, 10);
	max = (unsigned)strtoul(argv[5], NULL, 10);
	tr = fopen(argv[2], "rb");
	if (!tr)
		return perror(argv[2]), 2;
	for (;;) {
		struct rec r = {0};
		int k = fgetc(tr);
		if (k == EOF)
			break;
		r.kind = (char)k;
		if (r.kind != 'F' && fread(&r.a, 8, 1, tr) != 1)
			break;
		if (r.kind == 'W') {
			if (fread(&r.len, 4, 1, tr) != 1)
				break;
			r.data = ftell(tr);
			if (fseek(tr, r.len, SEEK_CUR))
				break;
		} else if (r.kind != 'F' && r.kind != 'T') {
			return fprintf(stderr, "replay: bad record kind %d\n", k), 2;
		}
		if (n == cap) {
			cap = cap ? cap * 2 : 1024;
			v = realloc(v, cap * sizeof(*v));
		}
		v[n++] = r;
	}
	flushes = malloc((n + 1) * sizeof(*flushes));
	for (size_t i = 0; i < n; i++)
		if (v[i].kind == 'F')
			flushes[nflush++] = i;
	flushes[nflush++] = n; /* the end of the trace is a cut point too */
	srandom(seed);
	for (size_t c = 0; c < nflush && made < max; c++) {
		/* Sample cut points evenly when there are more than max. */
		if (nflush > max && c % (nflush / max + 1) != 0 && c != nflush - 1)
			continue;
		size_t durable_end = c ? flushes[c - 1] : 0, cut = flushes[c];
		snprintf(path, sizeof(path), "%s/crash-%04u", argv[3], made);
		FILE *img = fopen(path, "w+b");
		init = fopen(argv[1], "rb");
		if (!img || !init)
			return perror(path), 2;
		char buf[65536];
		size_t k;
		while ((k = fread(buf, 1, sizeof(buf), init)) > 0)
			fwrite(buf, 1, k, img);
		fclose(init);
		/* REPLAY_BREAK=1 drops durable writes too: a self-test that the
		 * checks downstream catch an image no crash could produce. */
		for (size_t i = 0; i < durable_end; i++)
			if ((!getenv("REPLAY_BREAK") || random() % 2) && apply(img, tr, &v[i]) < 0)
				return perror("replay: apply"), 2;
		/* A random subset of the writes in flight at the crash, in trace
		 * order (the later of two overlapping writes wins, as on disk). */
		for (size_t i = durable_end; i < cut; i++)
			if (random() % 2 && apply(img, tr, &v[i]) < 0)
				return perror("replay: apply"), 2;
		fclose(img);
		made++;
	}
	printf("replay: %zu records, %zu flushes, %u crash images\n", n, nflush - 1, made);
	free(v);
	free(flushes);
	fclose(tr);
	return 0;
}
