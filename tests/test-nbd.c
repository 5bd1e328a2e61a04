/* streamfs: tests of the NBD byte source (fetch/nbd.c).
 *
 * The servers are nbdkit (file plugin, with its log, delay and multi-conn
 * filters for observation and faults) and qemu-nbd, started here on Unix
 * sockets (one test uses TCP on loopback) and stopped by PID. They serve an
 * 8 MiB file of random bytes with a hole in the middle:
 *	[0, 1 MiB) data, [1 MiB, 5 MiB) hole, [5 MiB, 8 MiB) data.
 * A test whose server is missing is skipped, or fails when CI is set. Every
 * fault must end in the right bytes (after a reconnect) or in -EIO, never in
 * wrong bytes. No test asserts anything about time: the waits are for
 * conditions (a pidfile, a line in nbdkit's log).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fetch.h"
#include "util.h"
#include "test-capture.h"

#define TEST_MIB	(1024 * 1024)
#define TEST_SIZE	(8 * TEST_MIB)
#define TEST_HOLE_START (1 * TEST_MIB)
#define TEST_HOLE_END	(5 * TEST_MIB)

static char test_dir[] = "/tmp/streamfs-test-nbd-XXXXXX";
static char test_file[512], test_file2[512], test_sock[512], test_uri[600], test_log[512];
static uint8_t *test_data;
static bool have_nbdkit, have_qemu_nbd;
static pid_t server_pid = -1;

/* ---- helpers ---- */

static void test_sleep_ms(long ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};

	nanosleep(&ts, NULL);
}

static uint64_t test_rand(void)
{
	static uint64_t x = 0x9e3779b97f4a7c15ULL;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

/* A missing server skips the test, except in CI where it must be there. */
static void test_need(bool have, const char *what)
{
	if (have)
		return;
	if (getenv("CI"))
		fail_msg("%s is not installed (CI is set: not skipping)", what);
	skip();
}

/* needle must be in log; show the log when it is not. */
static void test_assert_in_log(const char *log, const char *needle)
{
	if (!strstr(log, needle))
		fail_msg("'%s' is not in the messages:\n%s", needle, log);
}

/* Connect and retry settings for the next opens (0 = the defaults). */
static void test_set_options(unsigned retries, unsigned io_timeout, unsigned pool)
{
	struct fetch_options o = {
	    .retries = retries, .io_timeout = io_timeout, .connect_timeout = 2, .pool_size = pool};

	fetch_set_options(&o);
}

static void test_stop(void)
{
	if (server_pid > 0) {
		kill(server_pid, SIGKILL);
		waitpid(server_pid, NULL, 0);
	}
	server_pid = -1;
}

/* How many times needle occurs in the file path (0 if it is missing). */
static int test_count_in_file(const char *path, const char *needle)
{
	char buf[65536];
	FILE *f = fopen(path, "r");
	size_t n;
	int count = 0;

	if (!f)
		return 0;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = '\0';
	fclose(f);
	for (char *q = buf; (q = strstr(q, needle)); q++)
		count++;
	return count;
}

/* Wait (a condition, bounded at 30 s so a broken test ends) until needle
 * occurs at least n times in path. */
static void test_wait_in_file(const char *path, const char *needle, int n)
{
	for (int i = 0; i < 3000 && test_count_in_file(path, needle) < n; i++)
		test_sleep_ms(10);
	assert_true(test_count_in_file(path, needle) >= n);
}

/* Start a server: argv is run with the pidfile it writes once it serves;
 * wait for that pidfile (and test_sock, if on_sock). */
static void test_start_on(char *const argv[], const char *pidfile, bool on_sock)
{
	unlink(pidfile);
	unlink(test_sock);
	server_pid = fork();
	assert_true(server_pid >= 0);
	if (server_pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL); /* no orphan if the test dies */
		char err[600];
		int fd;

		/* Its complaints about killed connections are expected. */
		snprintf(err, sizeof(err), "%s/server.err", test_dir);
		fd = open(err, O_WRONLY | O_CREAT | O_APPEND, 0644);
		dup2(fd, 1);
		dup2(fd, 2);
		execvp(argv[0], argv);
		_exit(127);
	}
	for (int i = 0; i < 3000; i++) {
		struct stat st;

		if (stat(pidfile, &st) == 0 && st.st_size > 0 &&
		    (!on_sock || stat(test_sock, &st) == 0))
			return;
		if (waitpid(server_pid, NULL, WNOHANG) == server_pid) {
			server_pid = -1;
			fail_msg("%s did not start", argv[0]);
		}
		test_sleep_ms(10);
	}
	fail_msg("%s did not start", argv[0]);
}

static void test_start(char *const argv[], const char *pidfile)
{
	test_start_on(argv, pidfile, true);
}

/* nbdkit serving file on test_sock with the given filters and their
 * parameters (NULL-terminated list of words placed before "file"). */
static void test_start_nbdkit_args(const char *file, const char *const *pre,
				   const char *const *post)
{
	char pidfile[600], filearg[600];
	char *argv[32];
	int n = 0;

	snprintf(pidfile, sizeof(pidfile), "%s/nbdkit.pid", test_dir);
	snprintf(filearg, sizeof(filearg), "file=%s", file);
	argv[n++] = "nbdkit";
	argv[n++] = "-f";
	argv[n++] = "-U";
	argv[n++] = test_sock;
	argv[n++] = "-P";
	argv[n++] = pidfile;
	for (; pre && *pre; pre++)
		argv[n++] = (char *)*pre;
	argv[n++] = "file";
	argv[n++] = filearg;
	for (; post && *post; post++)
		argv[n++] = (char *)*post;
	argv[n] = NULL;
	test_start(argv, pidfile);
}

static void test_start_nbdkit(void)
{
	test_start_nbdkit_args(test_file, NULL, NULL);
}

static struct fetch_source *test_open_ok(const char *uri)
{
	struct fetch_source *s = NULL;

	assert_int_equal(fetch_open(uri, FETCH_RDONLY, &s), 0);
	assert_non_null(s);
	assert_int_equal(fetch_size(s), TEST_SIZE);
	assert_true(fetch_is_network(s));
	return s;
}

static void test_check_range(struct fetch_source *s, uint64_t off, size_t len)
{
	uint8_t *buf = malloc(len);

	assert_non_null(buf);
	assert_int_equal(fetch_pread(s, buf, len, off), 0);
	assert_memory_equal(buf, test_data + off, len);
	free(buf);
}

/* ---- setup ---- */

static int test_setup(void **state)
{
	int fd;

	if (!mkdtemp(test_dir))
		return -1;
	snprintf(test_file, sizeof(test_file), "%s/disk.raw", test_dir);
	snprintf(test_file2, sizeof(test_file2), "%s/other.raw", test_dir);
	snprintf(test_sock, sizeof(test_sock), "%s/nbd.sock", test_dir);
	snprintf(test_log, sizeof(test_log), "%s/nbdkit.log", test_dir);
	snprintf(test_uri, sizeof(test_uri), "nbd+unix:///?socket=%s", test_sock);
	test_data = calloc(1, TEST_SIZE);
	if (!test_data)
		return -1;
	for (size_t i = 0; i < TEST_SIZE; i += 8) {
		uint64_t v = test_rand();

		if (i < TEST_HOLE_START || i >= TEST_HOLE_END)
			memcpy(test_data + i, &v, 8);
	}
	fd = open(test_file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || pwrite(fd, test_data, TEST_HOLE_START, 0) != TEST_HOLE_START ||
	    pwrite(fd, test_data + TEST_HOLE_END, TEST_SIZE - TEST_HOLE_END, TEST_HOLE_END) !=
		TEST_SIZE - TEST_HOLE_END)
		return -1;
	close(fd);
	fd = open(test_file2, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || ftruncate(fd, TEST_SIZE + TEST_MIB) < 0)
		return -1;
	close(fd);
	have_nbdkit = system("nbdkit --version >/dev/null 2>&1") == 0;
	have_qemu_nbd = system("qemu-nbd --version >/dev/null 2>&1") == 0;
	if (!have_nbdkit)
		fprintf(stderr, "test-nbd: nbdkit not installed: its tests %s\n",
			getenv("CI") ? "fail" : "are skipped");
	if (!have_qemu_nbd)
		fprintf(stderr, "test-nbd: qemu-nbd not installed: its test %s\n",
			getenv("CI") ? "fails" : "is skipped");
	return 0;
}

static int test_teardown(void **state)
{
	char cmd[600];

	test_stop();
	snprintf(cmd, sizeof(cmd), "rm -rf %s", test_dir);
	if (system(cmd) != 0)
		return -1;
	free(test_data);
	return 0;
}

static int test_before(void **state)
{
	test_set_options(3, 2, 0);
	unlink(test_log);
	return 0;
}

static int test_after(void **state)
{
	test_stop();
	return 0;
}

/* ---- reads ---- */

/* Whole file in odd chunk sizes, reads spanning several pieces, unaligned
 * offsets, the last byte. */
static void test_nbd_read(void **state)
{
	static const size_t sizes[] = {1, 511, 4096, 65536 + 3, 3 * TEST_MIB + 17};
	struct fetch_source *s;

	test_need(have_nbdkit, "nbdkit");
	test_start_nbdkit();
	s = test_open_ok(test_uri);
	for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++)
		for (uint64_t off = 0; off < TEST_SIZE; off += sizes[k] * 7 + 12345)
			test_check_range(s, off, SFS_MIN(sizes[k], TEST_SIZE - off));
	test_check_range(s, 0, TEST_SIZE);
	test_check_range(s, TEST_SIZE - 1, 1);
	fetch_close(s);
}

struct test_reader {
	struct fetch_source *s;
	unsigned seed;
	int bad;
};

static void *test_reader_run(void *opaque)
{
	struct test_reader *t = opaque;
	uint8_t *buf = malloc(TEST_MIB + 4096);

	for (int i = 0; i < 60 && buf; i++) {
		uint64_t off = (uint64_t)rand_r(&t->seed) % TEST_SIZE;
		size_t len = (size_t)rand_r(&t->seed) % (TEST_MIB + 4096) + 1;

		len = SFS_MIN(len, (size_t)(TEST_SIZE - off));
		if (fetch_pread(t->s, buf, len, off) != 0 || memcmp(buf, test_data + off, len))
			t->bad++;
	}
	free(buf);
	return NULL;
}

static void test_threads(struct fetch_source *s)
{
	struct test_reader t[8];
	pthread_t th[8];

	for (int i = 0; i < 8; i++) {
		t[i] = (struct test_reader){.s = s, .seed = (unsigned)i * 7919 + 1};
		assert_int_equal(pthread_create(&th[i], NULL, test_reader_run, &t[i]), 0);
	}
	for (int i = 0; i < 8; i++) {
		pthread_join(th[i], NULL);
		assert_int_equal(t[i].bad, 0);
	}
}

/* Many threads, several connections (nbdkit's file plugin offers
 * multi-conn): one per pool slot, seen in nbdkit's log. */
static void test_nbd_read_threads_multi_conn(void **state)
{
	static const char *const pre[] = {"--filter=log", NULL};
	char logarg[600];
	const char *post[] = {logarg, NULL};
	struct fetch_source *s;

	test_need(have_nbdkit, "nbdkit");
	snprintf(logarg, sizeof(logarg), "logfile=%s", test_log);
	test_start_nbdkit_args(test_file, pre, post);
	test_set_options(3, 2, 3);
	s = test_open_ok(test_uri);
	test_threads(s);
	test_wait_in_file(test_log, "Connect ", 3);
	fetch_close(s);
	assert_int_equal(test_count_in_file(test_log, "Connect "), 3);
}

/* No multi-conn offered: one connection only, several requests in flight
 * on it (nbdkit with multi-conn-mode=disable, and a limit of one client
 * that would refuse a second connection). */
static void test_nbd_read_threads_one_conn(void **state)
{
	static const char *const pre[] = {"--filter=log", "--filter=multi-conn", "--filter=limit",
					  NULL};
	char logarg[600];
	const char *post[] = {logarg, "multi-conn-mode=disable", "limit=1", NULL};
	struct fetch_source *s;

	test_need(have_nbdkit, "nbdkit");
	snprintf(logarg, sizeof(logarg), "logfile=%s", test_log);
	test_start_nbdkit_args(test_file, pre, post);
	test_set_options(3, 2, 4);
	s = test_open_ok(test_uri);
	test_threads(s);
	fetch_close(s);
	assert_int_equal(test_count_in_file(test_log, "Connect "), 1);
}

/* qemu-nbd -r (no multi-conn, one client at a time by default). */
static void test_nbd_qemu_nbd(void **state)
{
	char pidfile[600];
	char *argv[] = {"qemu-nbd", "-r",	  "-t",	   "-f",      "raw", "-k",
			test_sock,  "--pid-file", pidfile, test_file, NULL};
	struct fetch_source *s;
	bool data;
	uint64_t n;

	test_need(have_qemu_nbd, "qemu-nbd");
	snprintf(pidfile, sizeof(pidfile), "%s/qemu-nbd.pid", test_dir);
	test_start(argv, pidfile);
	s = test_open_ok(test_uri);
	test_threads(s);
	assert_int_equal(fetch_extent(s, TEST_HOLE_START, TEST_MIB, &data, &n), 0);
	assert_false(data);
	assert_int_equal(n, TEST_MIB);
	fetch_close(s);
}

/* nbd://HOST:PORT/ and QEMU's nbd+tcp:// alias over loopback TCP. */
static void test_nbd_tcp(void **state)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t salen = sizeof(sa);
	char portarg[32], pidfile[600], filearg[600], uri[128];
	char *argv[] = {"nbdkit", "-f",	   "-i",   "127.0.0.1", "-p", portarg,
			"-P",	  pidfile, "file", filearg,	NULL};
	struct fetch_source *s;
	int fd;

	test_need(have_nbdkit, "nbdkit");
	/* A free port, handed to nbdkit (which has no port 0). */
	fd = socket(AF_INET, SOCK_STREAM, 0);
	assert_true(fd >= 0);
	assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &salen), 0);
	close(fd);
	snprintf(portarg, sizeof(portarg), "%d", ntohs(sa.sin_port));
	snprintf(pidfile, sizeof(pidfile), "%s/nbdkit-tcp.pid", test_dir);
	snprintf(filearg, sizeof(filearg), "file=%s", test_file);
	test_start_on(argv, pidfile, false);
	snprintf(uri, sizeof(uri), "nbd://127.0.0.1:%s/", portarg);
	s = test_open_ok(uri);
	test_check_range(s, 12345, 3 * TEST_MIB);
	fetch_close(s);
	snprintf(uri, sizeof(uri), "nbd+tcp://127.0.0.1:%s", portarg);
	s = test_open_ok(uri);
	test_check_range(s, TEST_SIZE - 4096, 4096);
	fetch_close(s);
}

/* In a child: read the whole source and compare; exit 0 if right. The
 * child ends by exec'ing true or false: the state it inherited (the
 * parent's NBD handles and its I/O threads' memory, which the child must
 * not tear down) is then not counted as leaked by valgrind's leak check
 * at its exit (make check-valgrind). */
static void test_child_reads(struct fetch_source *s)
{
	uint8_t *buf = malloc(TEST_SIZE);
	int ok =
	    buf && fetch_pread(s, buf, TEST_SIZE, 0) == 0 && memcmp(buf, test_data, TEST_SIZE) == 0;

	fetch_close(s);
	execl(ok ? "/bin/true" : "/bin/false", ok ? "true" : "false", (char *)NULL);
	_exit(ok ? 0 : 1);
}

/* The daemon forks after opening the chain, with or without reads before
 * (a qcow2 backing's header): the child reads right either way, and the
 * parent still does after a child used the source. */
static void test_nbd_fork(void **state)
{
	struct fetch_source *s;
	int status;
	pid_t pid;

	test_need(have_nbdkit, "nbdkit");
	test_start_nbdkit();
	for (int before = 0; before < 2; before++) {
		s = test_open_ok(test_uri);
		if (before)
			test_check_range(s, 0, 65536); /* the I/O threads run here */
		pid = fork();
		assert_true(pid >= 0);
		if (pid == 0)
			test_child_reads(s);
		assert_int_equal(waitpid(pid, &status, 0), pid);
		assert_true(WIFEXITED(status));
		assert_int_equal(WEXITSTATUS(status), 0);
		if (before)
			test_check_range(s, TEST_HOLE_END, TEST_MIB);
		fetch_close(s);
	}
}

static void test_open_plain(void *arg)
{
	struct fetch_source *s = NULL;

	assert_true(fetch_open(test_uri, FETCH_RDONLY, &s) < 0);
	assert_null(s);
}

/* nbds+unix:// with a TLS pre-shared key (user "alice" in the URI, the
 * key file in tls-psk-file=); a plain connection to a server that
 * requires TLS is refused, saying so. */
static void test_nbd_tls(void **state)
{
	char psk[600], pskarg[620], uri[1400], log[4096];
	const char *pre[] = {"--tls=require", pskarg, NULL};
	struct fetch_source *s;
	FILE *f;

	test_need(have_nbdkit, "nbdkit");
	snprintf(psk, sizeof(psk), "%s/keys.psk", test_dir);
	f = fopen(psk, "w");
	assert_non_null(f);
	fprintf(f, "alice:");
	for (int i = 0; i < 4; i++)
		fprintf(f, "%016llx", (unsigned long long)test_rand());
	fprintf(f, "\n");
	fclose(f);
	snprintf(pskarg, sizeof(pskarg), "--tls-psk=%s", psk);
	test_start_nbdkit_args(test_file, pre, NULL);
	snprintf(uri, sizeof(uri), "nbds+unix://alice@/?socket=%s&tls-psk-file=%s", test_sock, psk);
	s = test_open_ok(uri);
	test_check_range(s, TEST_HOLE_END - 4096, 2 * TEST_MIB);
	fetch_close(s);
	test_capture(test_open_plain, NULL, log, sizeof(log));
	test_assert_in_log(log, "TLS");
}

/* ---- holes ---- */

static void test_nbd_extent(void **state)
{
	struct fetch_source *s;
	bool data;
	uint64_t n;

	test_need(have_nbdkit, "nbdkit");
	test_start_nbdkit();
	s = test_open_ok(test_uri);
	assert_int_equal(fetch_extent(s, 0, TEST_SIZE, &data, &n), 0);
	assert_true(data);
	assert_int_equal(n, TEST_HOLE_START);
	assert_int_equal(fetch_extent(s, 4096, 8192, &data, &n), 0);
	assert_true(data);
	assert_int_equal(n, 8192);
	assert_int_equal(fetch_extent(s, TEST_HOLE_START, TEST_SIZE - TEST_HOLE_START, &data, &n),
			 0);
	assert_false(data);
	assert_int_equal(n, TEST_HOLE_END - TEST_HOLE_START);
	assert_int_equal(fetch_extent(s, TEST_HOLE_START + 65536, 65536, &data, &n), 0);
	assert_false(data);
	assert_int_equal(n, 65536);
	assert_int_equal(fetch_extent(s, TEST_HOLE_END, TEST_SIZE - TEST_HOLE_END, &data, &n), 0);
	assert_true(data);
	assert_int_equal(n, TEST_SIZE - TEST_HOLE_END);
	fetch_close(s);
}

/* A server without base:allocation: all data (the safe answer). */
static void test_nbd_extent_unsupported(void **state)
{
	static const char *const pre[] = {"--filter=noextents", NULL};
	struct fetch_source *s;
	bool data;
	uint64_t n;

	test_need(have_nbdkit, "nbdkit");
	test_start_nbdkit_args(test_file, pre, NULL);
	s = test_open_ok(test_uri);
	assert_int_equal(fetch_extent(s, TEST_HOLE_START, TEST_MIB, &data, &n), 0);
	assert_true(data);
	assert_int_equal(n, TEST_MIB);
	fetch_close(s);
}

/* ---- faults ---- */

/* The server restarts while the source is idle: the next read reconnects. */
static void test_nbd_restart_idle(void **state)
{
	struct fetch_source *s;

	test_need(have_nbdkit, "nbdkit");
	test_start_nbdkit();
	s = test_open_ok(test_uri);
	test_check_range(s, 0, 4096);
	test_stop();
	test_start_nbdkit();
	test_check_range(s, TEST_HOLE_END, TEST_MIB);
	test_check_range(s, 0, TEST_SIZE);
	fetch_close(s);
}

struct test_bg_read {
	struct fetch_source *s;
	uint64_t off;
	size_t len;
	uint8_t *buf;
	int r;
};

static void *test_bg_read_run(void *opaque)
{
	struct test_bg_read *b = opaque;

	b->r = fetch_pread(b->s, b->buf, b->len, b->off);
	return NULL;
}

/* Killed with a read in flight (the server holds it: delay filter), then
 * started again on the same socket: the read carries on with the right
 * bytes, after a reconnect. */
static void test_nbd_restart_inflight(void **state)
{
	static const char *const pre[] = {"--filter=log", "--filter=delay", NULL};
	char logarg[600];
	const char *post[] = {logarg, "delay-read=60", NULL};
	struct test_bg_read b = {.off = TEST_HOLE_END + 4096, .len = 2 * TEST_MIB};
	struct fetch_source *s;
	pthread_t th;

	test_need(have_nbdkit, "nbdkit");
	snprintf(logarg, sizeof(logarg), "logfile=%s", test_log);
	test_start_nbdkit_args(test_file, pre, post);
	test_set_options(5, 30, 0);
	s = test_open_ok(test_uri);
	b.s = s;
	b.buf = malloc(b.len);
	assert_non_null(b.buf);
	assert_int_equal(pthread_create(&th, NULL, test_bg_read_run, &b), 0);
	test_wait_in_file(test_log, "Read ", 1); /* the read is at the server */
	test_stop();
	test_start_nbdkit();
	pthread_join(th, NULL);
	assert_int_equal(b.r, 0);
	assert_memory_equal(b.buf, test_data + b.off, b.len);
	free(b.buf);
	fetch_close(s);
}

static struct fetch_source *test_fault_src;
static int test_fault_r;

static void test_fault_read(void *arg)
{
	uint8_t buf[4096];

	test_fault_r = fetch_pread(test_fault_src, buf, sizeof(buf), (uint64_t)(uintptr_t)arg);
}

/* A server that holds every read: each attempt is a stall, bounded by
 * io_timeout, and the read fails with -EIO naming the server. */
static void test_nbd_stall(void **state)
{
	static const char *const pre[] = {"--filter=delay", NULL};
	static const char *const post[] = {"delay-read=60", NULL};
	char log[8192];

	test_need(have_nbdkit, "nbdkit");
	test_start_nbdkit_args(test_file, pre, post);
	test_set_options(2, 1, 0);
	test_fault_src = test_open_ok(test_uri);
	test_capture(test_fault_read, (void *)(uintptr_t)4096, log, sizeof(log));
	assert_int_equal(test_fault_r, -EIO);
	test_assert_in_log(log, test_sock);
	test_assert_in_log(log, "stalled");
	test_assert_in_log(log, "reading bytes 4096-8191");
	test_assert_in_log(log, "giving up after retries");
	fetch_close(test_fault_src);
}

/* The server is gone for good: -EIO after the retries, naming the server;
 * and again on the next read. */
static void test_nbd_gone(void **state)
{
	char log[8192];

	test_need(have_nbdkit, "nbdkit");
	test_start_nbdkit();
	test_fault_src = test_open_ok(test_uri);
	test_stop();
	unlink(test_sock);
	test_capture(test_fault_read, (void *)(uintptr_t)0, log, sizeof(log));
	assert_int_equal(test_fault_r, -EIO);
	test_assert_in_log(log, test_sock);
	test_assert_in_log(log, "cannot connect");
	test_assert_in_log(log, "giving up after retries");
	test_capture(test_fault_read, (void *)(uintptr_t)TEST_HOLE_END, log, sizeof(log));
	assert_int_equal(test_fault_r, -EIO);
	/* Back: reads work again. */
	test_start_nbdkit();
	test_check_range(test_fault_src, TEST_HOLE_END, 4096);
	fetch_close(test_fault_src);
}

/* The server comes back with another export size: another image. Every
 * read fails from then on, one message says why. */
static void test_nbd_size_changed(void **state)
{
	char log[8192];

	test_need(have_nbdkit, "nbdkit");
	test_start_nbdkit();
	test_fault_src = test_open_ok(test_uri);
	test_stop();
	test_start_nbdkit_args(test_file2, NULL, NULL);
	test_capture(test_fault_read, (void *)(uintptr_t)0, log, sizeof(log));
	assert_int_equal(test_fault_r, -EIO);
	test_assert_in_log(log, "size changed from 8388608 to 9437184");
	test_stop();
	test_start_nbdkit();
	test_capture(test_fault_read, (void *)(uintptr_t)0, log, sizeof(log));
	assert_int_equal(test_fault_r, -EIO);
	fetch_close(test_fault_src);
}

/* ---- open ---- */

static void test_open_refused(void *arg)
{
	struct fetch_source *s = NULL;

	assert_int_equal(fetch_open(arg, FETCH_RDONLY, &s), -ENOENT);
	assert_null(s);
}

/* No server: open fails at once with a message that shows the socket path
 * but masks other query values. */
static void test_nbd_open_refused(void **state)
{
	char log[4096], uri[700];

	snprintf(uri, sizeof(uri), "nbd+unix:///exp?socket=%s/none.sock&tls-psk-file=SECRET",
		 test_dir);
	test_capture(test_open_refused, uri, log, sizeof(log));
	test_assert_in_log(log, "none.sock");
	test_assert_in_log(log, "cannot connect");
	assert_null(strstr(log, "SECRET"));
}

static void test_nbd_readonly(void **state)
{
	struct fetch_source *s = NULL;

	assert_int_equal(fetch_open(test_uri, FETCH_RDWR, &s), -EROFS);
	assert_null(s);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_nbd_read, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_read_threads_multi_conn, test_before,
					    test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_read_threads_one_conn, test_before,
					    test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_qemu_nbd, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_tcp, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_fork, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_tls, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_extent, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_extent_unsupported, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_restart_idle, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_restart_inflight, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_stall, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_gone, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_size_changed, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_open_refused, test_before, test_after),
	    cmocka_unit_test_setup_teardown(test_nbd_readonly, test_before, test_after),
	};

	return cmocka_run_group_tests(tests, test_setup, test_teardown);
}
