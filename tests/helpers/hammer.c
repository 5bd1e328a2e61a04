/* streamfs test helper: hammer one cluster at a time from many threads.
 *
 *   hammer DISK BACKING ROUNDS THREADS [DIRECT]
 *
 * Round r works on the 64 KiB cluster at r * 64 KiB * 7 (so each round hits
 * a fresh, unallocated cluster). All threads meet at a barrier, then at
 * once: even threads read the whole cluster (copy-on-read), odd threads write
 * their own 4 KiB slice, then read it back. After a second barrier, every
 * slice must hold its writer's data, untouched slices the backing's, and
 * every read must have returned, per slice, either backing data or the
 * owner's data: a copy-on-read of stale backing data overwriting a guest
 * write, or a torn cluster, fails the test.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CLUSTER 65536
#define SLICE	4096

static int disk_fd, direct_fd;
static uint8_t *backing;
static size_t backing_len;
static int nthreads, rounds;
static pthread_barrier_t barrier;
static volatile int failures;

static uint64_t cluster_off(int r)
{
	return ((uint64_t)r * 7 * CLUSTER) % (backing_len - CLUSTER);
}

static void slice_data(uint8_t *buf, int round, int thread)
{
	for (int i = 0; i < SLICE; i++)
		buf[i] = (uint8_t)(round * 31 + thread * 7 + i / 512 + 1);
}

/* A read racing a write of the same slice may see a mix of old and new
 * bytes (the page cache and the overlay file give no atomicity between
 * overlapping concurrent requests, nor does a disk), but every byte must be
 * the backing's or the slice owner's: never zeros, never another's data. */
static void check_slice(const uint8_t *got, int round, int slice, const char *what)
{
	uint8_t mine[SLICE];
	const uint8_t *base = backing + cluster_off(round) + (uint64_t)slice * SLICE;
	int written = slice % 2 == 1 && slice < nthreads;
	int i;

	slice_data(mine, round, slice);
	for (i = 0; i < SLICE; i++)
		if (got[i] != base[i] && !(written && got[i] == mine[i]))
			break;
	if (i < SLICE) {
		fprintf(stderr,
			"hammer: round %d slice %d: %s: unexpected data at byte %d: got %02x "
			"backing %02x written %02x\n",
			round, slice, what, i, got[i], base[i], mine[i]);
		__atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
	}
}

static void *worker(void *arg)
{
	int t = (int)(intptr_t)arg;
	uint8_t *buf = aligned_alloc(4096, CLUSTER);
	int fd = (direct_fd >= 0 && t % 4 == 1) ? direct_fd : disk_fd;

	for (int r = 0; r < rounds; r++) {
		uint64_t off = cluster_off(r);
		pthread_barrier_wait(&barrier);
		if (t % 2 == 0) {
			if (pread(fd, buf, CLUSTER, (off_t)off) != CLUSTER) {
				perror("hammer: pread");
				__atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
			} else {
				for (int s = 0; s < CLUSTER / SLICE; s++)
					check_slice(buf + s * SLICE, r, s, "racing read");
			}
		} else if (t < CLUSTER / SLICE) {
			slice_data(buf, r, t);
			if (pwrite(fd, buf, SLICE, (off_t)(off + (uint64_t)t * SLICE)) != SLICE) {
				perror("hammer: pwrite");
				__atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
			}
			if (pread(fd, buf, SLICE, (off_t)(off + (uint64_t)t * SLICE)) != SLICE ||
			    (slice_data(buf + SLICE, r, t), memcmp(buf, buf + SLICE, SLICE) != 0)) {
				fprintf(stderr, "hammer: round %d: thread %d lost its own write\n",
					r, t);
				__atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
			}
		}
		pthread_barrier_wait(&barrier);
		if (t == 0) {
			/* Final state of the cluster after the race. */
			uint8_t mine[SLICE];
			if (pread(disk_fd, buf, CLUSTER, (off_t)off) != CLUSTER)
				__atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
			for (int s = 0; s < CLUSTER / SLICE; s++) {
				const uint8_t *base = backing + off + (uint64_t)s * SLICE;
				slice_data(mine, r, s);
				int wrote = s % 2 == 1 && s < nthreads;
				if (memcmp(buf + s * SLICE, wrote ? mine : base, SLICE) != 0) {
					fprintf(
					    stderr,
					    "hammer: round %d slice %d: final data wrong (%s)\n", r,
					    s, wrote ? "guest write lost" : "backing data lost");
					__atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
				}
			}
		}
	}
	free(buf);
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t th[64];
	FILE *f;

	if (argc < 5)
		return fprintf(stderr, "usage: hammer DISK BACKING ROUNDS THREADS [direct]\n"), 2;
	rounds = atoi(argv[3]);
	nthreads = atoi(argv[4]);
	if (nthreads < 2 || nthreads > 64)
		return 2;
	disk_fd = open(argv[1], O_RDWR);
	direct_fd = argc > 5 ? open(argv[1], O_RDWR | O_DIRECT) : -1;
	f = fopen(argv[2], "rb");
	if (disk_fd < 0 || !f)
		return perror("hammer: open"), 2;
	fseek(f, 0, SEEK_END);
	backing_len = (size_t)ftell(f);
	rewind(f);
	backing = malloc(backing_len);
	if (fread(backing, 1, backing_len, f) != backing_len)
		return 2;
	fclose(f);
	pthread_barrier_init(&barrier, NULL, (unsigned)nthreads);
	for (int i = 0; i < nthreads; i++)
		pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i);
	for (int i = 0; i < nthreads; i++)
		pthread_join(th[i], NULL);
	free(backing);
	printf("hammer: %d rounds x %d threads, %d failures\n", rounds, nthreads, failures);
	return failures ? 1 : 0;
}
