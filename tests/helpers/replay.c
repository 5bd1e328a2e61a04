/* streamfs test helper: crash images from a recorded write trace, and a
 * guest-like writer whose flushes can be placed exactly in that trace.
 *
 *   replay write DISK LOG SEED TRACE [direct]
 *   replay build INITIAL TRACE OUTDIR SEED MAX
 *   replay verify DISK LOG BACKING D
 *
 * THE TRACE. With STREAMFS_TRACE=FILE the daemon appends every overlay
 * write ('W' u64 off, u32 len, data), fdatasync ('F') and truncate ('T' u64
 * size), little endian (fetch/fetch.c). Each record is appended under one
 * lock *after* its operation completed, and the lock is held across the
 * operation, so the file is a linearization: a W before an F completed
 * before that fdatasync began, hence is durable once the F is.
 *
 * MARKERS: placing the guest's flushes in the trace. `write` is
 * tests/helpers/writer.c's workload (random 512-aligned writes of 1..256
 * sectors, fdatasync every 1..16 writes, plus random reads that copy on
 * read), logging "W seq off len" before each pwrite. When an fdatasync on
 * DISK returns it appends a record 'M' u64 k to TRACE itself (O_APPEND; on
 * a local filesystem appends to a regular file do not interleave), and only
 * then logs "S k". The daemon appended the F records of that flush before it
 * answered the FUSE fsync, so in the trace:
 *   (a) every write logged before "S k" was made durable by some F that
 *       precedes M k;
 *   (b) every write logged after "S k" was issued after M k was appended,
 *       so all of its W records follow M k.
 * A crash image cut at flush record F_c holds everything up to the previous
 * flush F_{c-1} plus part of the window between F_{c-1} and F_c. There is no
 * F between F_{c-1} and F_c, so if M k lies before F_c, the F that made "S k"
 * durable lies at or before F_{c-1}, fully applied: with D = number of M
 * records before the cut, writes logged before "S D" MUST be in the image
 * (per sector: the last such write covering it, or the backing if none),
 * writes logged between "S D" and "S D+1" MAY be (sector by sector), and
 * writes logged after "S D+1" CANNOT be (their records follow M D+1, which
 * follows the cut). Copy-on-read and the stream job only ever copy backing
 * data, so every other sector must read as the backing. No timing, no
 * guessing: `verify ... D` checks exactly this.
 *
 * CRASH MODEL. `build` cuts at every F record and at the end of the trace
 * (sampling MAX of them if there are more: the first and the last eight
 * always, the rest at seeded random), and writes OUTDIR/crash-NNNN =
 * INITIAL + all records up to F_{c-1} + a crash of the window: for each
 * page (REPLAY_PAGE bytes, default 4096, the granularity of page-cache
 * writeback) a seeded random prefix, in trace order, of the window's writes
 * touching that page; truncates in the window happen or not. So pages are
 * lost or reordered against each other and large writes are torn, but a
 * page never holds a later write without the earlier ones (a written-back
 * page carries all of the page cache's contents). Every image is a state a
 * crash of the host could leave. REPLAY_MODEL=record instead applies a
 * random subset of whole records (stricter than any real crash when two
 * window writes share a page; for exploration, not the test).
 * REPLAY_BREAK=1 also drops half of the durable records: images no crash
 * can produce, for the test's self-check that the checks have teeth.
 * OUTDIR/manifest has a line "crash-NNNN D CUT_RECORD WINDOW_RECORDS" per
 * image; OUTDIR/full is INITIAL + the whole trace, which must equal the
 * overlay left by the clean unmount (proves the trace misses no write).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define SECTOR 512

/* ---- the guest-like writer, as in writer.c, plus trace markers ---- */

static uint64_t pattern(uint64_t seq, uint64_t pos)
{
	uint64_t x = seq * 0x9e3779b97f4a7c15ull ^ (pos / 8) * 0xbf58476d1ce4e5b9ull;
	x ^= x >> 31;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 29;
	return x | 1; /* never an all-zero word */
}

static void fill(uint8_t *buf, uint64_t seq, uint64_t off, uint64_t len)
{
	for (uint64_t i = 0; i < len; i += 8) {
		uint64_t v = pattern(seq, off + i);
		memcpy(buf + i, &v, 8);
	}
}

static int put_all(int fd, const void *p, size_t n)
{
	return write(fd, p, n) == (ssize_t)n ? 0 : -1;
}

static int do_write(const char *disk, const char *logpath, unsigned seed, const char *trace,
		    int direct)
{
	int fd = open(disk, O_RDWR | (direct ? O_DIRECT : 0));
	int logfd = open(logpath, O_WRONLY | O_APPEND | O_CREAT | O_TRUNC, 0644);
	int tfd = open(trace, O_WRONLY | O_APPEND);
	uint8_t *buf;
	uint64_t size, seq = 0, marks = 0;
	struct stat st;
	char line[128];
	int every;

	if (fd < 0 || logfd < 0 || tfd < 0 || fstat(fd, &st) < 0)
		return perror("replay write: open"), 2;
	if (posix_memalign((void **)&buf, 4096, 256 * SECTOR))
		return 2;
	size = (uint64_t)st.st_size;
	srandom(seed);
	every = (int)(random() % 16) + 1;
	if (put_all(logfd, "B\n", 2))
		return 2;
	for (int n = 1;; n++, seq++) {
		uint64_t len = ((uint64_t)random() % 256 + 1) * SECTOR;
		uint64_t off = ((uint64_t)random() % ((size - len) / SECTOR)) * SECTOR;
		int k;

		if (direct) { /* O_DIRECT through FUSE: keep it 4 KiB aligned */
			len = (len + 4095) & ~4095ull;
			off &= ~4095ull;
		}
		if (random() % 4 == 0) { /* a guest read: copy-on-read */
			uint64_t ro = ((uint64_t)random() % ((size - 65536) / 4096)) * 4096;
			if (pread(fd, buf, 65536, (off_t)ro) < 0)
				break;
		}
		fill(buf, seq, off, len);
		k = snprintf(line, sizeof(line), "W %llu %llu %llu\n", (unsigned long long)seq,
			     (unsigned long long)off, (unsigned long long)len);
		if (put_all(logfd, line, (size_t)k))
			return 2;
		if (pwrite(fd, buf, len, (off_t)off) != (ssize_t)len)
			break;
		if (n % every == 0) {
			uint8_t rec[9];
			uint64_t le;

			if (fdatasync(fd) != 0)
				break;
			marks++;
			le = htole64(marks);
			rec[0] = 'M';
			memcpy(rec + 1, &le, 8);
			if (put_all(tfd, rec, 9))
				return perror("replay write: trace marker"), 2;
			k = snprintf(line, sizeof(line), "S %llu\n", (unsigned long long)marks);
			if (put_all(logfd, line, (size_t)k))
				return 2;
			every = (int)(random() % 16) + 1;
			n = 0;
		}
	}
	close(fd);
	close(logfd);
	close(tfd);
	free(buf);
	return 0;
}

/* ---- the trace ---- */

struct rec {
	char kind;	     /* W F T M */
	uint32_t len;	     /* W */
	uint64_t a;	     /* W: offset, T: size, M: marker number */
	const uint8_t *data; /* W */
};

static struct rec *recs;
static size_t nrec;

static int parse_trace(const char *path)
{
	int fd = open(path, O_RDONLY);
	struct stat st;
	const uint8_t *p, *end;
	size_t cap = 0;

	if (fd < 0 || fstat(fd, &st) < 0)
		return perror(path), -1;
	if (st.st_size == 0)
		return fprintf(stderr, "replay: empty trace\n"), -1;
	p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (p == MAP_FAILED)
		return perror("mmap"), -1;
	close(fd);
	end = p + st.st_size;
	while (p < end) {
		struct rec r = {.kind = (char)*p++};
		uint64_t a;
		uint32_t l;

		if (r.kind != 'W' && r.kind != 'F' && r.kind != 'T' && r.kind != 'M')
			return fprintf(stderr, "replay: bad record kind 0x%02x at %zu\n",
				       (unsigned)(uint8_t)r.kind, nrec),
			       -1;
		if (r.kind != 'F') {
			if (end - p < 8)
				return fprintf(stderr, "replay: truncated record\n"), -1;
			memcpy(&a, p, 8);
			r.a = le64toh(a);
			p += 8;
		}
		if (r.kind == 'W') {
			if (end - p < 4)
				return fprintf(stderr, "replay: truncated record\n"), -1;
			memcpy(&l, p, 4);
			r.len = le32toh(l);
			p += 4;
			if ((uint64_t)(end - p) < r.len)
				return fprintf(stderr, "replay: truncated write data\n"), -1;
			r.data = p;
			p += r.len;
		}
		if (nrec == cap) {
			cap = cap ? cap * 2 : 4096;
			recs = realloc(recs, cap * sizeof(*recs));
			if (!recs)
				return -1;
		}
		recs[nrec++] = r;
	}
	return 0;
}

static int apply_range(int fd, const struct rec *r, uint64_t from, uint64_t to)
{
	if (r->kind == 'T')
		return ftruncate(fd, (off_t)r->a);
	if (r->kind != 'W')
		return 0;
	if (pwrite(fd, r->data + (from - r->a), to - from, (off_t)from) != (ssize_t)(to - from))
		return -1;
	return 0;
}

static int apply(int fd, const struct rec *r)
{
	return apply_range(fd, r, r->a, r->a + r->len);
}

static int copy_file(const char *from, const char *to)
{
	int in = open(from, O_RDONLY), out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	struct stat st;
	off_t left;

	if (in < 0 || out < 0 || fstat(in, &st) < 0)
		return -1;
	left = st.st_size;
	while (left > 0) {
		ssize_t n = copy_file_range(in, NULL, out, NULL, (size_t)left, 0);
		if (n <= 0)
			return -1;
		left -= n;
	}
	close(in);
	return close(out);
}

/* Page table for one window: page number -> how many window writes touch it,
 * how many of them (a prefix) the crash keeps, how many were seen so far. */
struct pg {
	uint64_t page; /* +1; 0 = empty slot */
	uint32_t n, keep, seen;
};
static struct pg *pgs;
static size_t pgcap;

static struct pg *pg_get(uint64_t page)
{
	size_t h = (size_t)((page * 0x9e3779b97f4a7c15ull) >> 20) & (pgcap - 1);

	while (pgs[h].page && pgs[h].page != page + 1)
		h = (h + 1) & (pgcap - 1);
	pgs[h].page = page + 1;
	return &pgs[h];
}

static int crash_window(int fd, size_t from, size_t to, uint64_t pagesz, int record_model)
{
	size_t pages = 0;

	if (record_model) {
		for (size_t i = from; i < to; i++)
			if (random() % 2 && apply(fd, &recs[i]) < 0)
				return -1;
		return 0;
	}
	for (size_t i = from; i < to; i++)
		if (recs[i].kind == 'W')
			pages += recs[i].len / pagesz + 2;
	for (pgcap = 64; pgcap < 2 * pages; pgcap *= 2)
		;
	free(pgs);
	pgs = calloc(pgcap, sizeof(*pgs));
	if (!pgs)
		return -1;
	for (size_t i = from; i < to; i++)
		if (recs[i].kind == 'W' && recs[i].len)
			for (uint64_t p = recs[i].a / pagesz;
			     p <= (recs[i].a + recs[i].len - 1) / pagesz; p++)
				pg_get(p)->n++;
	for (size_t h = 0; h < pgcap; h++)
		if (pgs[h].page)
			pgs[h].keep = (uint32_t)((uint64_t)random() % (pgs[h].n + 1));
	for (size_t i = from; i < to; i++) {
		const struct rec *r = &recs[i];

		if (r->kind == 'T') {
			if (random() % 2 && apply(fd, r) < 0)
				return -1;
			continue;
		}
		if (r->kind != 'W' || !r->len)
			continue;
		for (uint64_t p = r->a / pagesz; p <= (r->a + r->len - 1) / pagesz; p++) {
			struct pg *g = pg_get(p);
			uint64_t lo = p * pagesz, hi = lo + pagesz;

			if (g->seen++ >= g->keep)
				continue;
			lo = lo < r->a ? r->a : lo;
			hi = hi > r->a + r->len ? r->a + r->len : hi;
			if (apply_range(fd, r, lo, hi) < 0)
				return -1;
		}
	}
	return 0;
}

static int do_build(const char *initial, const char *trace, const char *outdir, unsigned seed,
		    unsigned max)
{
	size_t *cuts, ncut = 0, nw = 0, nm = 0, base_done = 0;
	char *pick, path[4096], base[4096];
	uint64_t pagesz = getenv("REPLAY_PAGE") ? strtoull(getenv("REPLAY_PAGE"), NULL, 0) : 4096;
	int record_model = getenv("REPLAY_MODEL") && !strcmp(getenv("REPLAY_MODEL"), "record");
	int brk = getenv("REPLAY_BREAK") != NULL, bfd;
	unsigned made = 0, npick = 0;
	FILE *man;

	if (parse_trace(trace) < 0)
		return 2;
	if (!pagesz || (pagesz & (pagesz - 1)))
		return fprintf(stderr, "replay: REPLAY_PAGE must be a power of two\n"), 2;
	cuts = malloc((nrec + 1) * sizeof(*cuts));
	pick = calloc(nrec + 1, 1);
	for (size_t i = 0; i < nrec; i++) {
		nw += recs[i].kind == 'W';
		nm += recs[i].kind == 'M';
		if (recs[i].kind == 'F')
			cuts[ncut++] = i;
	}
	cuts[ncut++] = nrec; /* the end of the trace is a cut point too */
	srandom(seed);
	/* Choose the cut points: all, or the first, the last eight and a
	 * seeded random sample of the rest. */
	if (ncut <= max) {
		memset(pick, 1, ncut);
		npick = (unsigned)ncut;
	} else {
		pick[0] = 1;
		npick = 1;
		for (size_t c = ncut - 8; c < ncut && npick < max; c++)
			npick += !pick[c], pick[c] = 1;
		while (npick < max) {
			size_t c = (size_t)random() % ncut;
			npick += !pick[c];
			pick[c] = 1;
		}
	}
	snprintf(base, sizeof(base), "%s/.durable", outdir);
	snprintf(path, sizeof(path), "%s/manifest", outdir);
	man = fopen(path, "w");
	if (!man || copy_file(initial, base) < 0 || (bfd = open(base, O_RDWR)) < 0)
		return perror("replay build"), 2;
	for (size_t c = 0; c < ncut; c++) {
		size_t durable_end = c ? cuts[c - 1] : 0, cut = cuts[c];
		unsigned d = 0;
		int fd;

		if (!pick[c])
			continue;
		/* Bring the durable image up to F_{c-1} (incrementally). */
		for (; base_done < durable_end; base_done++)
			if ((!brk || random() % 2) && apply(bfd, &recs[base_done]) < 0)
				return perror("replay: apply"), 2;
		for (size_t i = 0; i < cut; i++)
			d += recs[i].kind == 'M';
		snprintf(path, sizeof(path), "%s/crash-%04u", outdir, made);
		if (copy_file(base, path) < 0 || (fd = open(path, O_RDWR)) < 0)
			return perror(path), 2;
		if (crash_window(fd, durable_end, cut, pagesz, record_model) < 0)
			return perror("replay: apply"), 2;
		close(fd);
		fprintf(man, "crash-%04u %u %zu %zu\n", made, d, cut, cut - durable_end);
		made++;
	}
	fclose(man);
	/* The whole trace, applied in order: the overlay as it was left. */
	for (; base_done < nrec; base_done++)
		if (apply(bfd, &recs[base_done]) < 0)
			return perror("replay: apply"), 2;
	close(bfd);
	snprintf(path, sizeof(path), "%s/full", outdir);
	if (rename(base, path) < 0)
		return perror(path), 2;
	printf("replay: %zu records (%zu writes, %zu flushes, %zu guest sync markers), %zu cut "
	       "points, %u crash images (%s model%s)\n",
	       nrec, nw, ncut - 1, nm, ncut, made, record_model ? "record" : "page",
	       brk ? ", BROKEN on purpose" : "");
	free(cuts);
	free(pick);
	return 0;
}

/* ---- the verifier ---- */

struct wrec {
	uint64_t seq, off, len;
	unsigned syncs_before; /* S lines logged before this write */
};

static int do_verify(const char *disk, const char *logpath, const char *backing, unsigned d)
{
	FILE *lf = fopen(logpath, "r");
	struct wrec *w = NULL;
	size_t nw = 0, cap = 0, nwin = 0, *win = NULL;
	unsigned syncs = 0;
	int dfd = open(disk, O_RDONLY), bfd = open(backing, O_RDONLY);
	struct stat st;
	uint8_t *got, cand[SECTOR], bk[SECTOR];
	uint64_t nsec, bad = 0, from_durable = 0, from_window = 0;
	int32_t *last;
	char line[128];

	if (!lf || dfd < 0 || bfd < 0 || fstat(dfd, &st) < 0)
		return perror("verify: open"), 2;
	while (fgets(line, sizeof(line), lf)) {
		unsigned long long s, o, l;

		if (line[0] == 'B' && nw) {
			fprintf(stderr, "verify: one writer session per log\n");
			free(w);
			return 2;
		}
		if (line[0] == 'S') {
			syncs++;
		} else if (sscanf(line, "W %llu %llu %llu", &s, &o, &l) == 3) {
			if (nw == cap) {
				cap = cap ? cap * 2 : 1024;
				w = realloc(w, cap * sizeof(*w));
			}
			w[nw++] = (struct wrec){s, o, l, syncs};
		}
	}
	fclose(lf);
	if (d > syncs)
		d = syncs; /* killed between marker and log line: nothing more is known */
	nsec = (uint64_t)st.st_size / SECTOR;
	last = malloc(nsec * sizeof(*last));
	win = malloc((nw + 1) * sizeof(*win));
	got = malloc(1 << 20);
	if (!last || !win || !got) {
		free(w);
		free(win);
		free(last);
		free(got);
		return 2;
	}
	memset(last, 0xff, nsec * sizeof(*last));
	for (size_t i = 0; i < nw; i++) {
		if (w[i].syncs_before < d) /* durable */
			for (uint64_t s = w[i].off / SECTOR;
			     s < (w[i].off + w[i].len) / SECTOR && s < nsec; s++)
				last[s] = (int32_t)i;
		else if (w[i].syncs_before == d) /* may or may not be there */
			win[nwin++] = i;
	}
	for (uint64_t pos = 0; pos < nsec * SECTOR; pos += 1 << 20) {
		size_t n = nsec * SECTOR - pos < (1 << 20) ? nsec * SECTOR - pos : (1 << 20);

		if (pread(dfd, got, n, (off_t)pos) != (ssize_t)n) {
			fprintf(stderr, "verify: read error at %llu: %s\n", (unsigned long long)pos,
				strerror(errno));
			bad++; /* every table is freed below, as on success */
			break;
		}
		for (size_t o = 0; o < n; o += SECTOR) {
			uint64_t s = (pos + o) / SECTOR;
			int ok;

			if (last[s] < 0) {
				if (pread(bfd, bk, SECTOR, (off_t)(pos + o)) != SECTOR)
					memset(bk, 0, SECTOR);
				ok = memcmp(got + o, bk, SECTOR) == 0;
			} else {
				fill(cand, w[last[s]].seq, pos + o, SECTOR);
				ok = memcmp(got + o, cand, SECTOR) == 0;
			}
			from_durable += ok && last[s] >= 0;
			for (size_t j = 0; !ok && j < nwin; j++) {
				const struct wrec *x = &w[win[j]];
				if (x->off > pos + o || pos + o >= x->off + x->len)
					continue;
				fill(cand, x->seq, pos + o, SECTOR);
				ok = memcmp(got + o, cand, SECTOR) == 0;
				from_window += ok;
			}
			if (!ok && bad++ < 10)
				fprintf(stderr,
					"verify: sector at %llu holds unexpected data (%s)\n",
					(unsigned long long)(pos + o),
					last[s] < 0 ? "expected the backing's"
						    : "a durable write lost");
		}
	}
	fprintf(stderr,
		"verify: %zu writes logged, %u syncs durable of %u, %zu in the crash window; "
		"%llu sectors hold durable writes, %llu window writes\n",
		nw, d, syncs, nwin, (unsigned long long)from_durable,
		(unsigned long long)from_window);
	if (bad)
		fprintf(stderr, "verify: %llu bad sectors\n", (unsigned long long)bad);
	free(w);
	free(win);
	free(last);
	free(got);
	return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
	if ((argc == 6 || argc == 7) && !strcmp(argv[1], "write"))
		return do_write(argv[2], argv[3], (unsigned)strtoul(argv[4], NULL, 10), argv[5],
				argc == 7 && !strcmp(argv[6], "direct"));
	if (argc == 7 && !strcmp(argv[1], "build"))
		return do_build(argv[2], argv[3], argv[4], (unsigned)strtoul(argv[5], NULL, 10),
				(unsigned)strtoul(argv[6], NULL, 10));
	if (argc == 6 && !strcmp(argv[1], "verify"))
		return do_verify(argv[2], argv[3], argv[4], (unsigned)strtoul(argv[5], NULL, 10));
	fprintf(stderr, "usage: replay write DISK LOG SEED TRACE [direct]\n"
			"       replay build INITIAL TRACE OUTDIR SEED MAX\n"
			"       replay verify DISK LOG BACKING D\n");
	return 2;
}
