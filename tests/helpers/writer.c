/* streamfs test helper: a guest-like writer that records what it did, and
 * a verifier that checks a disk against that record after crashes.
 *
 *   writer write DISK LOG SEED     random 512-aligned writes until an error,
 *                                  fdatasync every few writes
 *   writer verify DISK LOG BACKING check every sector
 *   writer verify-weak DISK LOG BACKING  every sector is backing or some write
 *
 * LOG lines: "B" (a session began), "W seq off len" (written before the
 * pwrite is issued, so in-flight writes are known), "S" (an fdatasync
 * returned: every earlier write of this session is durable).
 * A sector must hold the data of the last durable write covering it (or
 * the backing's, if none), or of any later write that may or may not have
 * reached the disk. Anything else is corruption or a lost flushed write.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SECTOR 512

struct wrec {
	uint64_t seq, off, len;
	int durable;
};

/* Deterministic content of write 'seq' at disk offset 'pos' (8 bytes). */
static uint64_t pattern(uint64_t seq, uint64_t pos)
{
	uint64_t x = seq * 0x9e3779b97f4a7c15ull ^ (pos / 8) * 0xbf58476d1ce4e5b9ull;
	x ^= x >> 31;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 29;
	return x | 1; /* never an all-zero word, so zeros are never mistaken for data */
}

static void fill(uint8_t *buf, uint64_t seq, uint64_t off, uint64_t len)
{
	for (uint64_t i = 0; i < len; i += 8) {
		uint64_t v = pattern(seq, off + i);
		memcpy(buf + i, &v, 8);
	}
}

static int do_write(const char *disk, const char *logpath, unsigned seed)
{
	int fd = open(disk, O_RDWR), logfd;
	uint64_t size, seq;
	uint8_t *buf = malloc(256 * 1024);
	struct stat st;
	FILE *lf;
	char line[128];

	if (fd < 0 || fstat(fd, &st) < 0 || !buf)
		return perror("writer: open disk"), 2;
	size = (uint64_t)st.st_size;
	/* Continue the sequence numbers of earlier sessions. */
	seq = 0;
	lf = fopen(logpath, "r");
	if (lf) {
		while (fgets(line, sizeof(line), lf)) {
			unsigned long long s;
			if (sscanf(line, "W %llu", &s) == 1 && s >= seq)
				seq = s + 1;
		}
		fclose(lf);
	}
	logfd = open(logpath, O_WRONLY | O_APPEND | O_CREAT, 0644);
	if (logfd < 0)
		return perror("writer: log"), 2;
	srandom(seed);
	if (write(logfd, "B\n", 2) != 2)
		return 2;
	for (int n = 0;; n++, seq++) {
		uint64_t len = ((uint64_t)random() % 256 + 1) * SECTOR;
		uint64_t off = ((uint64_t)random() % ((size - len) / SECTOR)) * SECTOR;
		int k;

		fill(buf, seq, off, len);
		k = snprintf(line, sizeof(line), "W %llu %llu %llu\n", (unsigned long long)seq,
			     (unsigned long long)off, (unsigned long long)len);
		if (write(logfd, line, (size_t)k) != k)
			return 2;
		ssize_t w = 0;

		/* A short write (a full disk part way) is retried for its errno. */
		for (uint64_t done = 0; done < len && w >= 0; done += (uint64_t)w) {
			w = pwrite(fd, buf + done, len - done, (off_t)(off + done));
			if (w == 0)
				w = -1, errno = EIO;
		}
		if (w < 0) {
			perror("writer: stopped: pwrite");
			break;
		}
		if (n % 8 == 7) {
			if (fdatasync(fd) != 0) {
				perror("writer: stopped: fdatasync");
				break;
			}
			if (write(logfd, "S\n", 2) != 2)
				return 2;
		}
	}
	close(fd);
	close(logfd);
	free(buf);
	return 0;
}

/* weak: with nonzero, durability is not required: every sector must just be
 * the backing's or some logged write's (crash images built from a trace,
 * where the writer's fsyncs cannot be matched to trace positions). */
static int verify_weak;

static int do_verify(const char *disk, const char *logpath, const char *backing)
{
	FILE *lf = fopen(logpath, "r");
	struct wrec *w = NULL;
	size_t nw = 0, cap = 0, session_start = 0;
	char line[128];
	int dfd = open(disk, O_RDONLY), bfd = open(backing, O_RDONLY);
	struct stat st;
	uint8_t got[SECTOR], cand[SECTOR];
	uint64_t bad = 0;

	if (!lf || dfd < 0 || bfd < 0 || fstat(dfd, &st) < 0)
		return perror("verify: open"), 2;
	while (fgets(line, sizeof(line), lf)) {
		unsigned long long s, o, l;
		if (line[0] == 'B') {
			session_start = nw;
		} else if (line[0] == 'S') {
			for (size_t i = session_start; i < nw; i++)
				w[i].durable = 1;
		} else if (sscanf(line, "W %llu %llu %llu", &s, &o, &l) == 3) {
			if (nw == cap) {
				cap = cap ? cap * 2 : 1024;
				w = realloc(w, cap * sizeof(*w));
			}
			w[nw++] = (struct wrec){s, o, l, 0};
		}
	}
	fclose(lf);
	for (uint64_t sec = 0; sec < (uint64_t)st.st_size / SECTOR; sec++) {
		uint64_t pos = sec * SECTOR;
		long last_durable = -1;
		int ok = 0;

		if (pread(dfd, got, SECTOR, (off_t)pos) != SECTOR)
			return fprintf(stderr, "verify: read error at %llu\n",
				       (unsigned long long)pos),
			       1;
		for (size_t i = 0; i < nw && !verify_weak; i++)
			if (w[i].durable && w[i].off <= pos && pos < w[i].off + w[i].len)
				last_durable = (long)i;
		/* Candidate: the last durable state... */
		if (last_durable < 0) {
			if (pread(bfd, cand, SECTOR, (off_t)pos) != SECTOR)
				memset(cand, 0, SECTOR);
		} else {
			fill(cand, w[last_durable].seq, pos, SECTOR);
		}
		ok = memcmp(got, cand, SECTOR) == 0;
		/* ... or any later non-durable write covering the sector. */
		for (size_t i = (size_t)(last_durable + 1); !ok && i < nw; i++) {
			if ((w[i].durable && !verify_weak) || w[i].off > pos ||
			    pos >= w[i].off + w[i].len)
				continue;
			fill(cand, w[i].seq, pos, SECTOR);
			ok = memcmp(got, cand, SECTOR) == 0;
		}
		if (!ok && bad++ < 10)
			fprintf(stderr, "verify: sector at %llu holds unexpected data\n",
				(unsigned long long)pos);
	}
	free(w);
	if (bad)
		fprintf(stderr, "verify: %llu bad sectors (%zu writes logged)\n",
			(unsigned long long)bad, nw);
	return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && strcmp(argv[1], "write") == 0)
		return do_write(argv[2], argv[3], (unsigned)strtoul(argv[4], NULL, 10));
	if (argc == 5 && strcmp(argv[1], "verify") == 0)
		return do_verify(argv[2], argv[3], argv[4]);
	if (argc == 5 && strcmp(argv[1], "verify-weak") == 0) {
		verify_weak = 1;
		return do_verify(argv[2], argv[3], argv[4]);
	}
	fprintf(stderr, "usage: writer write DISK LOG SEED | writer verify DISK LOG BACKING\n");
	return 2;
}
