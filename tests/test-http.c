/* streamfs: tests of the HTTP(S) byte source (fetch/http.c).
 *
 * Three servers on loopback, all started here:
 *  - an in-process server (tsrv_*, threads of this process) for the pool
 *    and statistics tests: each request's fate is decided here and counted,
 *    so tests wait for conditions (8 requests held) and compare counters
 *    exactly; the Python server's faults are timed and uncounted;
 *  - tests/http-fault-server.py (Python 3, stdlib): Range support plus fault
 *    injection switched at run time through GET /control?mode=...;
 *  - nginx (if installed), with a generated config in a temp dir, serving the
 *    same file over http and https (self-signed certificate from openssl).
 * Tests whose server is missing are skipped. Every fault must end in the
 * right bytes (after retries) or a clean -errno, never in wrong bytes.
 *
 * STREAMFS_HTTP_BENCH=SIZE (e.g. 1G) adds a throughput comparison of
 * fetch_pread in 4 MiB chunks against `curl -o /dev/null` from nginx; it
 * prints figures and asserts nothing about time.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
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

#include <curl/curl.h>

#include "control.h"
#include "fetch.h"
#include "image.h"
#include "util.h"

#define TEST_MIB (1024 * 1024)

static char test_dir[] = "/tmp/streamfs-test-http-XXXXXX";
static char test_file[512];
static uint8_t *test_data;
static size_t test_len;
static pid_t fault_pid = -1;
static int fault_port;
static pid_t nginx_pid = -1;
static int nginx_port, nginx_tls_port;
static bool nginx_tls;
static char test_cert[512];

/* ---- helpers ---- */

static uint64_t test_rand(void)
{
	static uint64_t x = 0x9e3779b97f4a7c15ULL;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

static void test_sleep_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

	nanosleep(&ts, NULL);
}

static void test_set_options(unsigned retries)
{
	struct fetch_options o = {
	    .pool_size = 4,
	    .connect_timeout = 2,
	    .io_timeout = 1,
	    .retries = retries,
	};

	fetch_set_options(&o);
}

static int test_free_port(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

	if (fd < 0)
		return -1;
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
	    getsockname(fd, (struct sockaddr *)&a, &al) == 0)
		port = ntohs(a.sin_port);
	close(fd);
	return port;
}

static bool test_can_connect(int port)
{
	struct sockaddr_in a = {.sin_family = AF_INET,
				.sin_addr.s_addr = htonl(INADDR_LOOPBACK),
				.sin_port = htons((uint16_t)port)};
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	bool ok;

	if (fd < 0)
		return false;
	ok = connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
	close(fd);
	return ok;
}

static void test_stop(pid_t *pid)
{
	if (*pid > 0) {
		kill(*pid, SIGTERM);
		waitpid(*pid, NULL, 0);
	}
	*pid = -1;
}

static size_t test_sink(char *data, size_t size, size_t nmemb, void *opaque)
{
	FILE *f = opaque;

	if (f)
		fwrite(data, size, nmemb, f);
	return size * nmemb;
}

/* GET a control URL of the fault server; the body goes to out (if any). */
static void test_ctl(const char *fmt, ...)
{
	char path[256], url[512];
	CURL *c = curl_easy_init();
	va_list ap;
	long status = 0;

	va_start(ap, fmt);
	vsnprintf(path, sizeof(path), fmt, ap);
	va_end(ap);
	snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", fault_port, path);
	assert_non_null(c);
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, test_sink);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, NULL);
	assert_int_equal(curl_easy_perform(c), CURLE_OK);
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
	assert_int_equal(status, 200);
	curl_easy_cleanup(c);
}

/* The fault server's request log: "path host x-secret authorization" lines. */
static char *test_stats(void)
{
	char url[128], *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	CURL *c = curl_easy_init();

	snprintf(url, sizeof(url), "http://127.0.0.1:%d/stats", fault_port);
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, test_sink);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, f);
	assert_int_equal(curl_easy_perform(c), CURLE_OK);
	curl_easy_cleanup(c);
	fclose(f);
	return buf;
}

static void test_fault_url(char *url, size_t len, const char *path)
{
	snprintf(url, len, "http://127.0.0.1:%d%s", fault_port, path);
}

#define TEST_NEED_FAULT()                                                                          \
	do {                                                                                       \
		if (fault_pid < 0)                                                                 \
			skip();                                                                    \
		test_ctl("/control?mode=none");                                                    \
		test_set_options(3);                                                               \
	} while (0)

static struct fetch_source *test_open_ok(const char *url)
{
	struct fetch_source *s = NULL;

	assert_int_equal(fetch_open(url, FETCH_RDONLY, &s), 0);
	assert_non_null(s);
	assert_int_equal(fetch_size(s), test_len);
	return s;
}

static void test_check_range(struct fetch_source *s, uint64_t off, size_t len)
{
	uint8_t *buf = malloc(len);

	assert_non_null(buf);
	memset(buf, 0xa5, len);
	assert_int_equal(fetch_pread(s, buf, len, off), 0);
	assert_memory_equal(buf, test_data + off, len);
	free(buf);
}

/* Read the whole file in varied chunk sizes, then in one read (split). */
static void test_read_all(const char *url)
{
	static const size_t sizes[] = {1, 4095, 65536, TEST_MIB + 3, 3 * TEST_MIB, 511};
	struct fetch_source *s = test_open_ok(url);
	uint64_t off = 0;
	unsigned i = 0;

	while (off < test_len) {
		size_t n = sizes[i++ % (sizeof(sizes) / sizeof(sizes[0]))];

		if (i % 7 == 0)
			n = 1 + test_rand() % (2 * TEST_MIB);
		n = SFS_MIN(n, test_len - off);
		test_check_range(s, off, n);
		off += n;
	}
	test_check_range(s, 0, test_len);
	test_check_range(s, test_len - 1, 1);
	fetch_close(s);
}

struct test_thread {
	struct fetch_source *s;
	uint64_t seed;
	unsigned reads;
	int failed; /* -errno of a failed read */
	int nfailed;
	int wrong; /* reads that returned wrong bytes */
	int ok;
};

static void *test_thread_run(void *opaque)
{
	struct test_thread *t = opaque;
	size_t cap = 12 * TEST_MIB;
	uint8_t *buf = malloc(cap);

	for (unsigned i = 0; i < t->reads && buf; i++) {
		uint64_t x = t->seed = t->seed * 6364136223846793005ULL + 1442695040888963407ULL;
		size_t len = (i % 9 == 8) ? 9 * TEST_MIB : 1 + (x >> 20) % (2 * TEST_MIB);
		uint64_t off;
		int r;

		len = SFS_MIN(len, test_len);
		off = (x >> 11) % (test_len - len + 1);
		r = fetch_pread(t->s, buf, len, off);
		if (r < 0) {
			t->failed = r;
			t->nfailed++;
			continue;
		}
		if (memcmp(buf, test_data + off, len) != 0)
			t->wrong++;
		else
			t->ok++;
	}
	free(buf);
	return NULL;
}

/* Run n threads of random reads; returns how many reads failed/wrong. */
static void test_threads(struct fetch_source *s, unsigned n, unsigned reads, struct test_thread *t)
{
	pthread_t th[16];

	for (unsigned i = 0; i < n; i++) {
		t[i] = (struct test_thread){.s = s, .seed = test_rand(), .reads = reads};
		assert_int_equal(pthread_create(&th[i], NULL, test_thread_run, &t[i]), 0);
	}
	for (unsigned i = 0; i < n; i++)
		pthread_join(th[i], NULL);
}

static void test_read_threads(const char *url)
{
	struct fetch_source *s = test_open_ok(url);
	struct test_thread t[6];

	test_threads(s, 6, 25, t);
	for (unsigned i = 0; i < 6; i++) {
		assert_int_equal(t[i].failed, 0);
		assert_int_equal(t[i].wrong, 0);
		assert_int_equal(t[i].ok, 25);
	}
	fetch_close(s);
}

/* Open url and expect -err. */
static void test_open_fails(const char *url, int err)
{
	struct fetch_source *s = NULL;

	assert_int_equal(fetch_open(url, FETCH_RDONLY, &s), err);
	assert_null(s);
}

/* With the fault set by the caller, a 1 MiB read at an odd offset must
 * return the right bytes (r == 0) or exactly err. */
static void test_read_expect(struct fetch_source *s, int err)
{
	size_t len = TEST_MIB;
	uint64_t off = 12345;
	uint8_t *buf = malloc(len);
	int r;

	assert_non_null(buf);
	r = fetch_pread(s, buf, len, off);
	assert_int_equal(r, err);
	if (r == 0)
		assert_memory_equal(buf, test_data + off, len);
	free(buf);
}

/* Open the fault server's /data, then switch to mode and read. */
static void test_fault_read(const char *ctl, int err)
{
	char url[128];
	struct fetch_source *s;

	test_fault_url(url, sizeof(url), "/data");
	s = test_open_ok(url);
	test_ctl("/control?%s", ctl);
	test_read_expect(s, err);
	/* Whatever happened, a healthy server serves the right bytes again
	 * (none of these faults is a change of the file). */
	test_ctl("/control?mode=none");
	test_read_expect(s, 0);
	fetch_close(s);
}

/* ---- the in-process server (pool and statistics tests) ---- */

/* A gate holds the /data requests whose range starts in [from, to): they
 * get no answer while the gate is closed, except for `release` more of
 * them. Each counts the requests waiting now, those let through, and those
 * whose client hung up while held. */
struct tsrv_gate {
	uint64_t from, to;
	bool closed;
	unsigned release;
	unsigned waiting, passed, abandoned;
};

#define TSRV_MAX_CONNS 256

/* Serves test_data at /data (HTTP/1.1, keep-alive, one thread per
 * connection, ETag "t1"). Request n (1-based, /data only) is, in this
 * order of precedence: held by a gate; answered 503 if fail_every divides
 * n; stalled (headers and half the body, then silence until the client
 * hangs up) if stall_every divides n and fewer than stall_max stalled yet;
 * sent slowly (64 KiB, pause, ...) if slow_every divides n. */
static struct tsrv {
	int lfd, port;
	bool running;
	pthread_t accept_thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool stop;			   /* protected by lock */
	unsigned fail_every, stall_every;  /* protected by lock */
	unsigned stall_max, slow_every;	   /* protected by lock */
	struct tsrv_gate gate[2];	   /* protected by lock */
	unsigned seq, failed, stalled;	   /* /data requests seen, 503s, stalls */
	int fds[TSRV_MAX_CONNS];	   /* protected by lock; -1 once closed */
	pthread_t threads[TSRV_MAX_CONNS]; /* protected by lock */
	unsigned nconns;		   /* protected by lock */
} tsrv = {.lfd = -1, .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};

static bool tsrv_send(int fd, const void *buf, size_t len)
{
	const uint8_t *b = buf;

	while (len) {
		ssize_t n = send(fd, b, len, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return false;
		b += n;
		len -= (size_t)n;
	}
	return true;
}

/* Has the client hung up (or is the server stopping)? Waits up to ms. */
static bool tsrv_gone(int fd, int ms)
{
	struct pollfd pfd = {.fd = fd, .events = POLLIN};
	bool stop;
	char c;

	if (poll(&pfd, 1, ms) > 0 && recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) <= 0)
		return true;
	pthread_mutex_lock(&tsrv.lock);
	stop = tsrv.stop;
	pthread_mutex_unlock(&tsrv.lock);
	return stop;
}

/* Hold a request starting at off while its gate is closed. false if the
 * client hung up meanwhile. */
static bool tsrv_gate_pass(int fd, uint64_t off)
{
	struct tsrv_gate *g = NULL;
	bool ok = true;

	pthread_mutex_lock(&tsrv.lock);
	for (int i = 0; i < 2; i++)
		if (tsrv.gate[i].closed && off >= tsrv.gate[i].from && off < tsrv.gate[i].to)
			g = &tsrv.gate[i];
	if (!g) {
		pthread_mutex_unlock(&tsrv.lock);
		return true;
	}
	g->waiting++;
	pthread_cond_broadcast(&tsrv.cond);
	while (g->closed && !g->release && !tsrv.stop) {
		pthread_mutex_unlock(&tsrv.lock);
		ok = !tsrv_gone(fd, 20);
		pthread_mutex_lock(&tsrv.lock);
		if (!ok)
			break;
	}
	g->waiting--;
	if (ok && g->closed && g->release && !tsrv.stop)
		g->release--;
	if (ok && !tsrv.stop)
		g->passed++;
	else
		g->abandoned++;
	pthread_cond_broadcast(&tsrv.cond);
	pthread_mutex_unlock(&tsrv.lock);
	return ok;
}

/* Answer one request (hdr, NUL-terminated). false: close the connection. */
static bool tsrv_answer(int fd, const char *hdr)
{
	unsigned long long a, b;
	const char *rg = strcasestr(hdr, "\r\nRange: bytes=");
	char head[512];
	unsigned n;
	bool fail, stall, slow;
	size_t len, sent;

	if (strncmp(hdr, "GET /data ", 10) != 0) {
		snprintf(head, sizeof(head), "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
		return tsrv_send(fd, head, strlen(head));
	}
	if (!rg || sscanf(rg + 15, "%llu-%llu", &a, &b) != 2 || a > b || b >= test_len)
		return false;
	if (!tsrv_gate_pass(fd, a))
		return false;
	pthread_mutex_lock(&tsrv.lock);
	n = ++tsrv.seq;
	fail = tsrv.fail_every && n % tsrv.fail_every == 0;
	stall =
	    !fail && tsrv.stall_every && n % tsrv.stall_every == 0 && tsrv.stalled < tsrv.stall_max;
	slow = !fail && !stall && tsrv.slow_every && n % tsrv.slow_every == 0;
	tsrv.failed += fail;
	tsrv.stalled += stall;
	pthread_mutex_unlock(&tsrv.lock);
	if (fail) {
		snprintf(head, sizeof(head),
			 "HTTP/1.1 503 Busy\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n");
		return tsrv_send(fd, head, strlen(head));
	}
	len = (size_t)(b - a + 1);
	snprintf(
	    head, sizeof(head),
	    "HTTP/1.1 206 Partial Content\r\nETag: \"t1\"\r\nContent-Range: bytes %llu-%llu/%zu"
	    "\r\nContent-Length: %zu\r\n\r\n",
	    a, b, test_len, len);
	if (!tsrv_send(fd, head, strlen(head)))
		return false;
	if (stall) {
		tsrv_send(fd, test_data + a, len / 2);
		while (!tsrv_gone(fd, 50))
			;
		return false;
	}
	for (sent = 0; sent < len;) {
		size_t piece = slow ? SFS_MIN(len - sent, (size_t)65536) : len - sent;

		if (!tsrv_send(fd, test_data + a + sent, piece))
			return false;
		sent += piece;
		if (slow && sent < len)
			test_sleep_ms(1);
	}
	return true;
}

static void *tsrv_conn_run(void *opaque)
{
	int fd = (int)(intptr_t)opaque;
	char buf[8192];
	size_t have = 0;

	for (;;) {
		char *end;
		ssize_t n;

		buf[have] = '\0';
		end = strstr(buf, "\r\n\r\n");
		if (end) {
			end[2] = '\0';
			if (!tsrv_answer(fd, buf))
				break;
			/* No pipelining: a GET has no body, nothing follows. */
			have = 0;
			continue;
		}
		if (have == sizeof(buf) - 1)
			break;
		n = recv(fd, buf + have, sizeof(buf) - 1 - have, 0);
		if (n <= 0)
			break;
		have += (size_t)n;
	}
	/* Closed by the thread that owns it; shutdown() by tsrv_stop only. */
	pthread_mutex_lock(&tsrv.lock);
	for (unsigned i = 0; i < tsrv.nconns; i++)
		if (tsrv.fds[i] == fd)
			tsrv.fds[i] = -1;
	close(fd);
	pthread_mutex_unlock(&tsrv.lock);
	return NULL;
}

static void *tsrv_accept_run(void *opaque)
{
	for (;;) {
		int fd = accept4(tsrv.lfd, NULL, NULL, SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			return NULL; /* tsrv_stop shut the socket down */
		}
		pthread_mutex_lock(&tsrv.lock);
		if (tsrv.stop || tsrv.nconns == TSRV_MAX_CONNS ||
		    pthread_create(&tsrv.threads[tsrv.nconns], NULL, tsrv_conn_run,
				   (void *)(intptr_t)fd) != 0) {
			close(fd);
		} else {
			tsrv.fds[tsrv.nconns++] = fd;
		}
		pthread_mutex_unlock(&tsrv.lock);
	}
}

static void tsrv_start(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof(a);

	assert_false(tsrv.running);
	tsrv.lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(tsrv.lfd >= 0);
	assert_int_equal(bind(tsrv.lfd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(tsrv.lfd, 64), 0);
	assert_int_equal(getsockname(tsrv.lfd, (struct sockaddr *)&a, &al), 0);
	tsrv.port = ntohs(a.sin_port);
	tsrv.stop = false;
	tsrv.nconns = 0;
	tsrv.seq = tsrv.failed = tsrv.stalled = 0;
	tsrv.fail_every = tsrv.stall_every = tsrv.stall_max = tsrv.slow_every = 0;
	memset(tsrv.gate, 0, sizeof(tsrv.gate));
	assert_int_equal(pthread_create(&tsrv.accept_thread, NULL, tsrv_accept_run, NULL), 0);
	tsrv.running = true;
}

static void tsrv_stop(void)
{
	unsigned n;

	if (!tsrv.running)
		return;
	pthread_mutex_lock(&tsrv.lock);
	tsrv.stop = true;
	pthread_cond_broadcast(&tsrv.cond);
	for (unsigned i = 0; i < tsrv.nconns; i++)
		if (tsrv.fds[i] >= 0)
			shutdown(tsrv.fds[i], SHUT_RDWR);
	pthread_mutex_unlock(&tsrv.lock);
	shutdown(tsrv.lfd, SHUT_RDWR);
	pthread_join(tsrv.accept_thread, NULL);
	close(tsrv.lfd);
	tsrv.lfd = -1;
	pthread_mutex_lock(&tsrv.lock);
	n = tsrv.nconns; /* the accept thread is gone: no more */
	pthread_mutex_unlock(&tsrv.lock);
	for (unsigned i = 0; i < n; i++)
		pthread_join(tsrv.threads[i], NULL);
	tsrv.running = false;
}

/* Wait until gate g holds want requests (the deadline only turns a hang
 * into a failure). */
static void tsrv_wait_held(int g, unsigned want)
{
	struct timespec dl;

	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += 60;
	pthread_mutex_lock(&tsrv.lock);
	while (tsrv.gate[g].waiting < want)
		if (pthread_cond_timedwait(&tsrv.cond, &tsrv.lock, &dl) == ETIMEDOUT) {
			unsigned n = tsrv.gate[g].waiting;

			pthread_mutex_unlock(&tsrv.lock);
			fail_msg("gate %d: %u requests held, expected %u", g, n, want);
		}
	pthread_mutex_unlock(&tsrv.lock);
}

static void tsrv_gate_set(int g, uint64_t from, uint64_t to, bool closed)
{
	pthread_mutex_lock(&tsrv.lock);
	tsrv.gate[g].from = from;
	tsrv.gate[g].to = to;
	tsrv.gate[g].closed = closed;
	tsrv.gate[g].release = 0;
	pthread_cond_broadcast(&tsrv.cond);
	pthread_mutex_unlock(&tsrv.lock);
}

static void tsrv_url(char *url, size_t len)
{
	snprintf(url, len, "http://127.0.0.1:%d/data", tsrv.port);
}

/* One reader thread of the pool tests: reads of the given class. */
struct tpool_reader {
	struct fetch_source *s;
	enum fetch_class cls;
	uint64_t seed, off;
	size_t len; /* fixed read (reads == 1), or 0: random reads */
	unsigned reads;
	uint64_t bytes; /* read successfully */
	int r;		/* first error */
	int wrong;	/* reads with wrong bytes */
	bool done;	/* protected by tsrv.lock */
};

static void *tpool_reader_run(void *opaque)
{
	struct tpool_reader *t = opaque;
	uint8_t *buf = malloc(10 * TEST_MIB);

	assert_non_null(buf);
	fetch_set_thread_class(t->cls);
	for (unsigned i = 0; i < t->reads; i++) {
		uint64_t x = t->seed = t->seed * 6364136223846793005ULL + 1442695040888963407ULL;
		size_t len = t->len;
		uint64_t off = t->off;
		int r;

		if (!len) {
			/* Mostly small and medium; every 5th large enough to split. */
			len = (i % 5 == 4) ? 9 * TEST_MIB : 1 + (x >> 20) % (3 * TEST_MIB / 2);
			len = SFS_MIN(len, test_len);
			off = (x >> 11) % (test_len - len + 1);
		}
		r = fetch_pread(t->s, buf, len, off);
		if (r < 0 && t->r == 0)
			t->r = r;
		if (r == 0 && memcmp(buf, test_data + off, len) != 0)
			t->wrong++;
		if (r == 0)
			t->bytes += len;
	}
	free(buf);
	pthread_mutex_lock(&tsrv.lock);
	t->done = true;
	pthread_cond_broadcast(&tsrv.cond);
	pthread_mutex_unlock(&tsrv.lock);
	return NULL;
}

static void tpool_options(unsigned pool, unsigned connect_timeout, unsigned io_timeout,
			  unsigned retries)
{
	struct fetch_options o = {
	    .pool_size = pool,
	    .connect_timeout = connect_timeout,
	    .io_timeout = io_timeout,
	    .retries = retries,
	};

	fetch_set_options(&o);
}

/* ---- servers ---- */

static int test_start_fault_server(void)
{
	const char *srcdir = getenv("srcdir") ? getenv("srcdir") : "tests";
	char script[512], portfile[600];
	struct stat st;

	snprintf(script, sizeof(script), "%s/http-fault-server.py", srcdir);
	snprintf(portfile, sizeof(portfile), "%s/fault.port", test_dir);
	if (stat(script, &st) != 0 || system("python3 -c 'import http.server' 2>/dev/null") != 0) {
		fprintf(stderr, "test-http: no python3 or %s: fault tests skipped\n", script);
		return -1;
	}
	fault_pid = fork();
	if (fault_pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGTERM); /* no orphan if the test dies */
		execlp("python3", "python3", script, "--file", test_file, "--port-file", portfile,
		       (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 1000; i++) { /* the server renames the port file into place */
		FILE *f = fopen(portfile, "r");

		if (f) {
			if (fscanf(f, "%d", &fault_port) != 1)
				fault_port = 0;
			fclose(f);
			if (fault_port > 0)
				return 0;
		}
		if (waitpid(fault_pid, NULL, WNOHANG) == fault_pid) {
			fault_pid = -1;
			break;
		}
		test_sleep_ms(10);
	}
	fprintf(stderr, "test-http: fault server did not start: fault tests skipped\n");
	test_stop(&fault_pid);
	return -1;
}

static int test_start_nginx(void)
{
	const char *nginx = access("/usr/sbin/nginx", X_OK) == 0 ? "/usr/sbin/nginx" : "nginx";
	char conf[600], log[600], cmd[1400], key[600];
	FILE *f;

	nginx_port = test_free_port();
	nginx_tls_port = test_free_port();
	snprintf(test_cert, sizeof(test_cert), "%s/cert.pem", test_dir);
	snprintf(key, sizeof(key), "%s/key.pem", test_dir);
	snprintf(cmd, sizeof(cmd),
		 "openssl req -x509 -newkey rsa:2048 -nodes -keyout %s -out %s -days 2 "
		 "-subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 >/dev/null 2>&1",
		 key, test_cert);
	nginx_tls = system(cmd) == 0;
	snprintf(cmd, sizeof(cmd), "%s -v >/dev/null 2>&1", nginx);
	if (system(cmd) != 0) {
		fprintf(stderr, "test-http: nginx not installed: nginx tests skipped\n");
		return -1;
	}
	snprintf(conf, sizeof(conf), "%s/nginx.conf", test_dir);
	snprintf(log, sizeof(log), "%s/nginx-error.log", test_dir);
	f = fopen(conf, "w");
	assert_non_null(f);
	fprintf(f,
		"daemon off;\nworker_processes 1;\npid %s/nginx.pid;\nerror_log %s;\n%s"
		"events { worker_connections 256; }\n"
		"http {\n  access_log off;\n  sendfile on;\n  keepalive_requests 1000000;\n"
		"  default_type application/octet-stream;\n"
		"  client_body_temp_path %s/tmp-body;\n  proxy_temp_path %s/tmp-proxy;\n"
		"  fastcgi_temp_path %s/tmp-fastcgi;\n"
		"  server { listen 127.0.0.1:%d; root %s/www; }\n",
		test_dir, log, geteuid() == 0 ? "user root;\n" : "", test_dir, test_dir, test_dir,
		nginx_port, test_dir);
	if (nginx_tls)
		fprintf(f,
			"  server { listen 127.0.0.1:%d ssl; root %s/www;\n"
			"    ssl_certificate %s; ssl_certificate_key %s; }\n",
			nginx_tls_port, test_dir, test_cert, key);
	fprintf(f, "}\n");
	fclose(f);
	nginx_pid = fork();
	if (nginx_pid == 0) {
		int fd;

		prctl(PR_SET_PDEATHSIG, SIGTERM); /* no orphan if the test dies */
		fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
		}
		execl(nginx, nginx, "-p", test_dir, "-e", log, "-c", conf, (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 500; i++) {
		if (test_can_connect(nginx_port) &&
		    (!nginx_tls || test_can_connect(nginx_tls_port)))
			return 0;
		if (waitpid(nginx_pid, NULL, WNOHANG) == nginx_pid) {
			nginx_pid = -1;
			break;
		}
		test_sleep_ms(10);
	}
	fprintf(stderr, "test-http: nginx did not start (see %s): nginx tests skipped\n", log);
	test_stop(&nginx_pid);
	return -1;
}

static int test_setup(void **state)
{
	char path[600];
	int fd;

	curl_global_init(CURL_GLOBAL_DEFAULT);
	if (!mkdtemp(test_dir))
		return -1;
	chmod(test_dir, 0755);
	snprintf(path, sizeof(path), "%s/www", test_dir);
	mkdir(path, 0755);
	snprintf(test_file, sizeof(test_file), "%s/www/data.bin", test_dir);

	/* 8..32 MiB, not a multiple of anything. */
	{
		struct timespec ts;

		clock_gettime(CLOCK_REALTIME, &ts);
		for (long i = ts.tv_nsec % 97; i > 0; i--)
			test_rand();
	}
	test_len = 8 * TEST_MIB + test_rand() % (24 * TEST_MIB);
	test_data = malloc(test_len);
	if (!test_data)
		return -1;
	for (size_t i = 0; i + 8 <= test_len; i += 8) {
		uint64_t x = test_rand();

		memcpy(test_data + i, &x, 8);
	}
	for (size_t i = test_len & ~(size_t)7; i < test_len; i++)
		test_data[i] = (uint8_t)test_rand();
	fd = open(test_file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, test_data, test_len) != (ssize_t)test_len)
		return -1;
	close(fd);

	test_start_fault_server();
	test_start_nginx();
	sfs_log_level = getenv("STREAMFS_TEST_VERBOSE") ? SFS_LOG_DEBUG : SFS_LOG_WARN;
	return 0;
}

static int test_teardown(void **state)
{
	char cmd[600];

	tsrv_stop(); /* after a failed pool test */
	test_stop(&fault_pid);
	test_stop(&nginx_pid);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", test_dir);
	if (system(cmd) != 0)
		fprintf(stderr, "test-http: could not remove %s\n", test_dir);
	free(test_data);
	return 0;
}

/* ---- tests: plain reads ---- */

static void test_http_read_chunks(void **state)
{
	char url[128];

	TEST_NEED_FAULT();
	test_fault_url(url, sizeof(url), "/data");
	test_read_all(url);
}

static void test_http_read_threads(void **state)
{
	char url[128];

	TEST_NEED_FAULT();
	test_fault_url(url, sizeof(url), "/data");
	test_read_threads(url);
}

static void test_http_nginx_read_chunks(void **state)
{
	char url[128];

	if (nginx_pid < 0)
		skip();
	test_set_options(3);
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/data.bin", nginx_port);
	test_read_all(url);
}

static void test_http_nginx_read_threads(void **state)
{
	char url[128];

	if (nginx_pid < 0)
		skip();
	test_set_options(3);
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/data.bin", nginx_port);
	test_read_threads(url);
}

static void test_http_nginx_404(void **state)
{
	char url[128];

	if (nginx_pid < 0)
		skip();
	test_set_options(3);
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/missing.bin", nginx_port);
	test_open_fails(url, -ENOENT);
}

/* ---- tests: TLS (nginx with a self-signed certificate) ---- */

static void test_http_tls_verify(void **state)
{
	struct fetch_options o = {.connect_timeout = 2, .io_timeout = 1, .retries = 2};
	struct fetch_source *s;
	char url[128];

	if (nginx_pid < 0 || !nginx_tls)
		skip();
	snprintf(url, sizeof(url), "https://127.0.0.1:%d/data.bin", nginx_tls_port);
	/* Unknown CA: refused, there is no insecure mode. */
	fetch_set_options(&o);
	test_open_fails(url, -EIO);
	/* Trusted with the cacert option. */
	o.cacert = test_cert;
	fetch_set_options(&o);
	s = test_open_ok(url);
	test_check_range(s, 1000, 3 * TEST_MIB);
	fetch_close(s);
	/* Right CA, wrong name (the certificate is for 127.0.0.1 only). */
	snprintf(url, sizeof(url), "https://localhost:%d/data.bin", nginx_tls_port);
	test_open_fails(url, -EIO);
}

/* ---- tests: faults that are retried ---- */

static void test_http_retry_drop(void **state)
{
	TEST_NEED_FAULT();
	test_fault_read("mode=drop&count=2", 0);
}

static void test_http_retry_503(void **state)
{
	TEST_NEED_FAULT();
	test_fault_read("mode=503&count=2&retry_after=1", 0);
}

static void test_http_retry_429(void **state)
{
	TEST_NEED_FAULT();
	test_fault_read("mode=429&count=1&retry_after=1", 0);
}

static void test_http_retry_500(void **state)
{
	TEST_NEED_FAULT();
	test_fault_read("mode=500&count=1", 0);
}

static void test_http_retry_stall(void **state)
{
	TEST_NEED_FAULT();
	test_fault_read("mode=stall&count=1&stall=3", 0);
	test_fault_read("mode=stall-body&count=1&stall=3", 0);
}

static void test_http_retry_short(void **state)
{
	TEST_NEED_FAULT();
	test_fault_read("mode=short&count=2", 0);
	test_fault_read("mode=short-cl&count=1", 0);
}

static void test_http_no_content_length(void **state)
{
	TEST_NEED_FAULT();
	test_fault_read("mode=no-cl", 0);
}

/* ---- tests: faults that fail cleanly ---- */

static void test_http_fail_503_forever(void **state)
{
	uint64_t t0;

	TEST_NEED_FAULT();
	test_set_options(2);
	t0 = sfs_now_ns();
	test_fault_read("mode=503&retry_after=1", -EIO);
	/* Bounded: 2 attempts, one Retry-After of 1 s (loose bound, not a timing test). */
	assert_true(sfs_now_ns() - t0 < 20ULL * 1000000000);
}

static void test_http_fail_stall_forever(void **state)
{
	TEST_NEED_FAULT();
	test_set_options(2);
	test_fault_read("mode=stall&stall=3", -ETIMEDOUT);
	test_fault_read("mode=stall-body&stall=3", -ETIMEDOUT);
}

static void test_http_fail_short_forever(void **state)
{
	TEST_NEED_FAULT();
	test_set_options(2);
	test_fault_read("mode=short", -EIO);
	test_fault_read("mode=short-cl", -EIO);
}

static void test_http_fail_bad_range(void **state)
{
	TEST_NEED_FAULT();
	test_fault_read("mode=bad-range", -EIO);
}

static void test_http_fail_long_body(void **state)
{
	TEST_NEED_FAULT();
	test_fault_read("mode=long", -EIO);
}

static void test_http_fail_ignore_range(void **state)
{
	char url[128];

	TEST_NEED_FAULT();
	test_fault_url(url, sizeof(url), "/data");
	/* Mid-run: that read fails; not sticky. */
	test_fault_read("mode=ignore-range", -EIO);
	/* At open: refused. */
	test_ctl("/control?mode=ignore-range");
	test_open_fails(url, -EOPNOTSUPP);
}

static void test_http_fail_no_size(void **state)
{
	char url[128];

	TEST_NEED_FAULT();
	test_fault_url(url, sizeof(url), "/data");
	test_ctl("/control?mode=no-size");
	test_open_fails(url, -EOPNOTSUPP);
}

static void test_http_fail_status(void **state)
{
	char url[128];

	TEST_NEED_FAULT();
	test_fault_url(url, sizeof(url), "/data");
	test_ctl("/control?mode=404");
	test_open_fails(url, -ENOENT);
	test_ctl("/control?mode=403");
	test_open_fails(url, -EACCES);
	test_ctl("/control?mode=401");
	test_open_fails(url, -EACCES);
	test_ctl("/control?mode=none");
	test_fault_url(url, sizeof(url), "/no-such-file");
	test_open_fails(url, -ENOENT);
	/* Mid-run. */
	test_fault_read("mode=404", -ENOENT);
}

static void test_http_fail_refused(void **state)
{
	char url[128];
	int port = test_free_port();

	test_set_options(2);
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/data", port);
	test_open_fails(url, -ECONNREFUSED);
}

static void test_http_fail_url_credentials(void **state)
{
	test_set_options(2);
	test_open_fails("http://user:secret@127.0.0.1:1/data", -EINVAL);
}

/* ---- tests: URLs as shown in status files and messages ---- */

static void test_http_display_uri(void **state)
{
	static const struct {
		const char *uri, *shown;
	} cases[] = {
	    /* Local names are shown as they are. */
	    {"/var/lib/img/base.qcow2", "/var/lib/img/base.qcow2"},
	    {"rel/base.qcow2?x=1", "rel/base.qcow2?x=1"},
	    {"file:///a/b?c=d", "file:///a/b?c=d"},
	    {"mem:base", "mem:base"},
	    {"/odd/dir://x", "/odd/dir://x"},
	    {"-", "-"},
	    /* Nothing to hide. */
	    {"http://h/x", "http://h/x"},
	    {"https://h:8443/a/b.raw", "https://h:8443/a/b.raw"},
	    {"http://h/pkg@1.0/x", "http://h/pkg@1.0/x"},
	    /* Query values (signed URLs) and fragments. */
	    {"https://h/x?token=SECRET", "https://h/x?token=***"},
	    {"https://h/x?a=SECRET&b=SECRET&c=", "https://h/x?a=***&b=***&c="},
	    {"https://h/x?SECRET", "https://h/x?***"},
	    {"https://h/x?a=SECRET=SECRET&&b", "https://h/x?a=***&&***"},
	    {"https://h/x?t=SECRET#SECRET", "https://h/x?t=***#***"},
	    {"https://h/x#SECRET", "https://h/x#***"},
	    {"https://h/x?", "https://h/x"},
	    /* Credentials. */
	    {"http://user:SECRET@h/x", "http://***@h/x"},
	    {"http://SECRET@h/x", "http://***@h/x"},
	    {"http://:SECRET@h/x", "http://***@h/x"},
	    {"http://u;SECRET:SECRET@h:81/x?k=SECRET", "http://***@h:81/x?k=***"},
	    {"ftp://u:SECRET@h/x", "ftp://***@h/x"},
	    /* Not parsable by libcurl: still masked, conservatively. */
	    {"http://u:SE/CRET@h/x", "http://***@h/x"},
	    {"http://u:SECRET@h:99999/x?t=SECRET#SECRET", "http://***@h:99999/x?t=***#***"},
	    {"http://h/a b?t=SECRET", "http://h/a b?t=***"},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char *d = fetch_display_uri(cases[i].uri);

		assert_non_null(d);
		if (strcmp(d, cases[i].shown) != 0)
			fail_msg("'%s' shown as '%s', expected '%s'", cases[i].uri, d,
				 cases[i].shown);
		free(d);
	}
}

/* A refused URL is named without its password, and with its query masked. */
static void test_http_refusal_hides_secrets(void **state)
{
	char log[4096] = "";
	FILE *tmp = tmpfile();
	int saved = dup(2);
	struct fetch_source *s = NULL;
	size_t n;

	assert_non_null(tmp);
	test_set_options(1);
	fflush(stderr);
	assert_true(dup2(fileno(tmp), 2) >= 0);
	assert_int_equal(fetch_open("http://user:SECRET@127.0.0.1:1/d?t=SECRET", 0, &s), -EINVAL);
	assert_int_equal(fetch_open("gopher://user:SECRET@h/d?t=SECRET", 0, &s), -EPROTONOSUPPORT);
	assert_int_equal(fetch_open("http://127.0.0.1:1/d?t=SECRET", FETCH_RDWR, &s), -EROFS);
	fflush(stderr);
	dup2(saved, 2);
	close(saved);
	rewind(tmp);
	n = fread(log, 1, sizeof(log) - 1, tmp);
	fclose(tmp);
	log[n] = '\0';
	fprintf(stderr, "%s", log);
	assert_non_null(strstr(log, "http://***@127.0.0.1:1/d?t=***: credentials in the URL"));
	assert_non_null(strstr(log, "gopher://***@h/d?t=***: unsupported scheme 'gopher'"));
	assert_null(strstr(log, "SECRET"));
}

/* ---- tests: the file changes on the server ---- */

static void test_http_changed(const char *extra)
{
	char url[128];
	struct fetch_source *s;

	test_fault_url(url, sizeof(url), "/data");
	s = test_open_ok(url);
	test_read_expect(s, 0);
	test_ctl("/control?mode=change%s", extra);
	test_read_expect(s, -EIO);
	/* Sticky, even if the server goes back to the old contents. */
	test_ctl("/control?mode=none");
	test_read_expect(s, -EIO);
	fetch_close(s);
	/* A fresh open sees the current file. */
	s = test_open_ok(url);
	test_read_expect(s, 0);
	fetch_close(s);
}

static void test_http_changed_if_match(void **state)
{
	TEST_NEED_FAULT();
	test_http_changed(""); /* server answers 412 to If-Match */
}

static void test_http_changed_etag(void **state)
{
	TEST_NEED_FAULT();
	test_http_changed("&ignore_if_match=1"); /* server ignores If-Match: ETag compare */
}

static void test_http_changed_concurrent(void **state)
{
	char url[128];
	struct test_thread t[6];
	struct fetch_source *s;
	int nfailed = 0;

	TEST_NEED_FAULT();
	test_fault_url(url, sizeof(url), "/data");
	s = test_open_ok(url);
	test_ctl("/control?mode=change&after=20&ignore_if_match=1");

	test_threads(s, 6, 12, t);
	for (unsigned i = 0; i < 6; i++) {
		assert_int_equal(t[i].wrong, 0);
		if (t[i].nfailed)
			assert_int_equal(t[i].failed, -EIO);
		nfailed += t[i].nfailed;
	}
	assert_true(nfailed > 0);
	test_read_expect(s, -EIO);
	fetch_close(s);
}

static void test_http_no_validator(void **state)
{
	char url[128];
	struct fetch_source *s;

	TEST_NEED_FAULT();
	test_ctl("/control?mode=no-validator");
	test_fault_url(url, sizeof(url), "/data");
	s = test_open_ok(url); /* with a warning */
	test_read_expect(s, 0);
	fetch_close(s);
}

/* ---- tests: redirects and credentials ---- */

static void test_http_redirect(void **state)
{
	char url[128];
	struct fetch_source *s;

	TEST_NEED_FAULT();
	test_fault_url(url, sizeof(url), "/redirect-same");
	s = test_open_ok(url);
	test_check_range(s, 77, TEST_MIB);
	fetch_close(s);
	test_fault_url(url, sizeof(url), "/redirect-loop");
	test_open_fails(url, -ELOOP);
	test_fault_url(url, sizeof(url), "/redirect-ftp");
	test_open_fails(url, -EPROTONOSUPPORT);
}

static void test_http_auth(const char *line, const char *path, const char *expect_stats)
{
	struct fetch_options o = {.connect_timeout = 2, .io_timeout = 1, .retries = 2};
	char auth[600], url[128], *stats;
	struct fetch_source *s;
	FILE *f;

	snprintf(auth, sizeof(auth), "%s/auth", test_dir);
	f = fopen(auth, "w");
	assert_non_null(f);
	fprintf(f, "# comment\n\n%s\n", line);
	fclose(f);
	chmod(auth, 0600);
	o.http_auth_file = auth;
	fetch_set_options(&o);
	test_ctl("/control?mode=none");
	test_fault_url(url, sizeof(url), path);
	s = test_open_ok(url);
	test_check_range(s, 5, 1000);
	fetch_close(s);
	stats = test_stats();
	if (strcmp(stats, expect_stats) != 0)
		fprintf(stderr, "server saw:\n%s\nexpected:\n%s\n", stats, expect_stats);
	assert_string_equal(stats, expect_stats);
	free(stats);
	test_set_options(3);
}

static void test_http_auth_header(void **state)
{
	char expect[512];

	TEST_NEED_FAULT();
	snprintf(expect, sizeof(expect),
		 "/data 127.0.0.1:%d hunter2 -\n/data 127.0.0.1:%d hunter2 -\n", fault_port,
		 fault_port);
	test_http_auth("X-Secret: hunter2", "/data", expect);
}

static void test_http_auth_basic(void **state)
{
	char expect[512];

	TEST_NEED_FAULT();
	/* base64("user:pass word") */
	snprintf(expect, sizeof(expect),
		 "/data 127.0.0.1:%d - Basic_dXNlcjpwYXNzIHdvcmQ=\n"
		 "/data 127.0.0.1:%d - Basic_dXNlcjpwYXNzIHdvcmQ=\n",
		 fault_port, fault_port);
	test_http_auth("user:pass word", "/data", expect);
}

static void test_http_auth_cross_redirect(void **state)
{
	char expect[512];

	TEST_NEED_FAULT();
	/* Credentials reach the origin given, never the other host. */
	snprintf(expect, sizeof(expect),
		 "/redirect-cross 127.0.0.1:%d hunter2 -\n/data localhost:%d - -\n"
		 "/data localhost:%d - -\n",
		 fault_port, fault_port, fault_port);
	test_http_auth("X-Secret: hunter2", "/redirect-cross", expect);
	snprintf(expect, sizeof(expect),
		 "/redirect-cross 127.0.0.1:%d - Basic_dTpw\n/data localhost:%d - -\n"
		 "/data localhost:%d - -\n",
		 fault_port, fault_port, fault_port);
	test_http_auth("u:p", "/redirect-cross", expect);
}

/* ---- tests: the connection pool (in-process server) ---- */

/* 8 threads, guest and job, read at random (some reads split) while the
 * server fails every 7th request, stalls three, and sends every 3rd one
 * slowly so that answers come back out of order: every byte is exact, and
 * the statistics match what the server did, request for request. */
static void test_http_pool_faults_exact(void **state)
{
	struct tpool_reader t[8];
	pthread_t th[8];
	struct fetch_net_stats ns;
	struct fetch_source *s;
	uint64_t want[FETCH_NCLASSES] = {0};
	unsigned seq, failed, stalled;
	char url[128];

	tsrv_start();
	tpool_options(0, 2, 1, 5); /* the default pool */
	tsrv_url(url, sizeof(url));
	s = test_open_ok(url);
	pthread_mutex_lock(&tsrv.lock);
	tsrv.fail_every = 7;
	tsrv.stall_every = 11;
	tsrv.stall_max = 3;
	tsrv.slow_every = 3;
	pthread_mutex_unlock(&tsrv.lock);
	for (unsigned i = 0; i < 8; i++) {
		t[i] = (struct tpool_reader){.s = s,
					     .cls = i % 2 ? FETCH_CLASS_JOB : FETCH_CLASS_GUEST,
					     .seed = test_rand(),
					     .reads = 12};
		assert_int_equal(pthread_create(&th[i], NULL, tpool_reader_run, &t[i]), 0);
	}
	for (unsigned i = 0; i < 8; i++) {
		pthread_join(th[i], NULL);
		assert_int_equal(t[i].r, 0);
		assert_int_equal(t[i].wrong, 0);
		want[t[i].cls] += t[i].bytes;
	}
	pthread_mutex_lock(&tsrv.lock);
	seq = tsrv.seq;
	failed = tsrv.failed;
	stalled = tsrv.stalled;
	pthread_mutex_unlock(&tsrv.lock);
	assert_true(failed > 0);
	assert_int_equal(stalled, 3);

	assert_int_equal(fetch_net_stats(s, &ns), 0);
	assert_int_equal(ns.bytes[FETCH_CLASS_GUEST], want[FETCH_CLASS_GUEST]);
	assert_int_equal(ns.bytes[FETCH_CLASS_JOB], want[FETCH_CLASS_JOB]);
	assert_int_equal(ns.in_flight[FETCH_CLASS_GUEST], 0);
	assert_int_equal(ns.in_flight[FETCH_CLASS_JOB], 0);
	assert_int_equal(ns.requests, seq); /* the probe at open included */
	assert_int_equal(ns.retries, failed + stalled);
	assert_int_equal(ns.stalls, stalled);
	assert_int_equal(ns.errors, 0);
	assert_int_equal(ns.latency_count, seq - 1 - failed - stalled);
	assert_true(ns.connections >= 1 && ns.connections <= 8 + 2);
	assert_false(isnan(ns.latency_p50_s) || isnan(ns.rtt_s) || isnan(ns.rate_bytes_per_s));
	assert_true(ns.rtt_s >= 0 && ns.rtt_s <= ns.latency_p50_s);
	assert_true(ns.latency_p50_s <= ns.latency_p99_s);
	assert_true(ns.latency_sum_s >= ns.latency_p50_s);
	fetch_close(s);
	tsrv_stop();
}

/* Wait until reader t is done (the deadline only turns a hang into a
 * failure). */
static void tpool_wait_done(struct tpool_reader *t)
{
	struct timespec dl;

	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += 60;
	pthread_mutex_lock(&tsrv.lock);
	while (!t->done)
		if (pthread_cond_timedwait(&tsrv.cond, &tsrv.lock, &dl) == ETIMEDOUT) {
			pthread_mutex_unlock(&tsrv.lock);
			fail_msg("reader did not finish");
		}
	pthread_mutex_unlock(&tsrv.lock);
}

/* The job holds every connection it may have (its requests held by the
 * server, a 9th job read waiting): a guest read still gets a connection
 * and completes, while all 8 job requests are still held - it never
 * waited for one of them. Before the guest reserve, it got a connection
 * only when a job request gave up (connect + io timeout), which the server
 * counts as abandoned. */
static void test_http_pool_guest_first(void **state)
{
	const size_t jl = 64 * 1024;
	struct tpool_reader job[9], guest;
	pthread_t th[9], gth;
	unsigned n;
	struct fetch_net_stats ns;
	struct fetch_source *s;
	uint64_t half = test_len / 2;
	char url[128];

	tsrv_start();
	tpool_options(8, 5, 5, 1);
	tsrv_url(url, sizeof(url));
	s = test_open_ok(url);
	assert_int_equal(fetch_guest_inflight(), 0);
	tsrv_gate_set(0, half, test_len, true); /* the job's reads */
	tsrv_gate_set(1, 0, 1, true);		/* the first guest read */
	for (unsigned i = 0; i < 9; i++) {
		job[i] = (struct tpool_reader){
		    .s = s, .cls = FETCH_CLASS_JOB, .off = half + i * jl, .len = jl, .reads = 1};
		assert_int_equal(pthread_create(&th[i], NULL, tpool_reader_run, &job[i]), 0);
	}
	tsrv_wait_held(0, 8);
	assert_int_equal(fetch_net_stats(s, &ns), 0);
	assert_int_equal(ns.in_flight[FETCH_CLASS_JOB], 8);
	assert_int_equal(ns.in_flight[FETCH_CLASS_GUEST], 0);

	/* A guest read reaches the server beside the 8 job requests, and
	 * counts as a guest read on the network while it is there. */
	guest = (struct tpool_reader){.s = s, .cls = FETCH_CLASS_GUEST, .len = 4096, .reads = 1};
	assert_int_equal(pthread_create(&gth, NULL, tpool_reader_run, &guest), 0);
	tsrv_wait_held(1, 1);
	pthread_mutex_lock(&tsrv.lock);
	n = tsrv.gate[0].abandoned;
	pthread_mutex_unlock(&tsrv.lock);
	if (n)
		fail_msg("the guest read waited for a job's connection (%u job requests gave up)",
			 n);
	assert_int_equal(fetch_guest_inflight(), 1);
	assert_int_equal(fetch_net_stats(s, &ns), 0);
	assert_int_equal(ns.in_flight[FETCH_CLASS_GUEST], 1);
	assert_int_equal(ns.in_flight[FETCH_CLASS_JOB], 8);
	tsrv_gate_set(1, 0, 1, false);
	tpool_wait_done(&guest);
	pthread_join(gth, NULL);
	assert_int_equal(guest.r, 0);
	assert_int_equal(guest.wrong, 0);
	/* And one from this thread (GUEST by default), 2 MiB. */
	test_check_range(s, TEST_MIB, 2 * TEST_MIB);
	assert_int_equal(fetch_guest_inflight(), 0);

	/* Both guest reads completed while the job's 8 were held: none gave
	 * up, none was answered, and the 9th job read never reached the
	 * server (the job holds at most pool_size connections). */
	pthread_mutex_lock(&tsrv.lock);
	n = tsrv.gate[0].waiting * 1000 + tsrv.gate[0].abandoned + tsrv.gate[0].passed;
	for (unsigned i = 0; i < 9; i++)
		n += job[i].done;
	pthread_mutex_unlock(&tsrv.lock);
	assert_int_equal(n, 8 * 1000); /* 8 held; none gave up, passed or is done */

	tsrv_gate_set(0, half, test_len, false);
	for (unsigned i = 0; i < 9; i++) {
		pthread_join(th[i], NULL);
		assert_int_equal(job[i].r, 0);
		assert_int_equal(job[i].wrong, 0);
	}
	assert_int_equal(fetch_net_stats(s, &ns), 0);
	assert_int_equal(ns.bytes[FETCH_CLASS_JOB], 9 * jl);
	assert_int_equal(ns.bytes[FETCH_CLASS_GUEST], 4096 + 2 * TEST_MIB);
	assert_int_equal(ns.in_flight[FETCH_CLASS_JOB] + ns.in_flight[FETCH_CLASS_GUEST], 0);
	assert_int_equal(ns.errors, 0);
	assert_true(ns.connections <= 8 + 2);
	fetch_close(s);
	tsrv_stop();
}

/* Wait until s has that many reads of each class waiting for a
 * connection (the deadline only turns a hang into a failure). */
static void tpool_wait_waiting(struct fetch_source *s, unsigned guest, unsigned job)
{
	struct fetch_net_stats ns;

	for (int i = 0;; i++) {
		assert_int_equal(fetch_net_stats(s, &ns), 0);
		if (ns.waiting[FETCH_CLASS_GUEST] == guest && ns.waiting[FETCH_CLASS_JOB] == job)
			return;
		if (i == 6000)
			fail_msg("waiting for a connection: %llu guest, %llu job; expected %u, %u",
				 (unsigned long long)ns.waiting[FETCH_CLASS_GUEST],
				 (unsigned long long)ns.waiting[FETCH_CLASS_JOB], guest, job);
		test_sleep_ms(10);
	}
}

/* Guests hold every connection (pool 1 + the reserve of 2); a job read
 * and then a guest read wait. The first connection released goes to the
 * guest, though the job has waited longer. */
static void test_http_pool_guest_before_job(void **state)
{
	struct tpool_reader g[4], job;
	pthread_t gth[4], jth;
	struct fetch_net_stats ns;
	unsigned n;
	struct fetch_source *s;
	uint64_t half = test_len / 2;
	char url[128];

	tsrv_start();
	tpool_options(1, 5, 5, 1);
	tsrv_url(url, sizeof(url));
	s = test_open_ok(url);
	tsrv_gate_set(0, half, test_len, true); /* the job's read */
	tsrv_gate_set(1, 0, half, true);	/* the guests' reads */
	for (unsigned i = 0; i < 4; i++)
		g[i] = (struct tpool_reader){
		    .s = s, .cls = FETCH_CLASS_GUEST, .off = i * 4096, .len = 4096, .reads = 1};
	job = (struct tpool_reader){
	    .s = s, .cls = FETCH_CLASS_JOB, .off = half, .len = 4096, .reads = 1};
	for (unsigned i = 0; i < 3; i++)
		assert_int_equal(pthread_create(&gth[i], NULL, tpool_reader_run, &g[i]), 0);
	tsrv_wait_held(1, 3);
	assert_int_equal(pthread_create(&jth, NULL, tpool_reader_run, &job), 0);
	tpool_wait_waiting(s, 0, 1);
	assert_int_equal(pthread_create(&gth[3], NULL, tpool_reader_run, &g[3]), 0);
	tpool_wait_waiting(s, 1, 1);

	/* Let one guest request through: its connection goes to the guest. */
	pthread_mutex_lock(&tsrv.lock);
	tsrv.gate[1].release = 1;
	pthread_cond_broadcast(&tsrv.cond);
	pthread_mutex_unlock(&tsrv.lock);
	/* Whoever took the connection, its request reaches a gate. */
	pthread_mutex_lock(&tsrv.lock);
	while (tsrv.gate[1].passed < 1 || (tsrv.gate[1].waiting < 3 && !tsrv.gate[0].waiting))
		pthread_cond_wait(&tsrv.cond, &tsrv.lock);
	n = tsrv.gate[0].waiting;
	pthread_mutex_unlock(&tsrv.lock);
	if (n)
		fail_msg("the job took the connection released while a guest read waited");
	tpool_wait_waiting(s, 0, 1);

	tsrv_gate_set(1, 0, half, false);
	tsrv_gate_set(0, half, test_len, false);
	for (unsigned i = 0; i < 4; i++) {
		pthread_join(gth[i], NULL);
		assert_int_equal(g[i].r, 0);
		assert_int_equal(g[i].wrong, 0);
	}
	pthread_join(jth, NULL);
	assert_int_equal(job.r, 0);
	assert_int_equal(fetch_net_stats(s, &ns), 0);
	assert_int_equal(ns.bytes[FETCH_CLASS_GUEST], 4 * 4096);
	assert_int_equal(ns.bytes[FETCH_CLASS_JOB], 4096);
	assert_int_equal(ns.waiting[FETCH_CLASS_GUEST] + ns.waiting[FETCH_CLASS_JOB], 0);
	assert_true(ns.connections <= 1 + 2);
	fetch_close(s);
	tsrv_stop();
}

/* ---- tests: control/status and control/metrics over HTTP ---- */

/* The value of "key: value" in a status text, as a number; fails if the
 * key is missing or the value is not a number. */
static double test_status_num(const char *text, const char *key)
{
	size_t kl = strlen(key);
	const char *p = text;

	for (; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
		if (strncmp(p, key, kl) == 0 && p[kl] == ':' && p[kl + 1] == ' ') {
			char *end;
			double v = strtod(p + kl + 2, &end);

			if (end == p + kl + 2 || *end != '\n')
				fail_msg("status %s: not a number", key);
			return v;
		}
	}
	fail_msg("status key %s is missing", key);
	return 0;
}

/* A qcow2 overlay in memory over the in-process server's file (raw): the
 * net_* keys of control/status and the metrics agree with the fetch
 * layer's figures, guest and job bytes apart, and with network_bytes. */
static void test_http_control_status_net(void **state)
{
	struct image_create_opts o = {.size = test_len & ~(uint64_t)511, .backing_fmt = "raw"};
	struct fetch_net_stats before, after;
	struct control_ctx c = {0};
	struct image *top;
	uint8_t *buf = malloc(TEST_MIB);
	char url[128], *text;
	size_t len;
	uint64_t guest, job;

	assert_non_null(buf);
	tsrv_start();
	tpool_options(0, 2, 1, 3);
	tsrv_url(url, sizeof(url));
	fetch_mem_reset();
	o.backing_name = url;
	assert_int_equal(image_create("mem:ovl", "qcow2", &o), 0);
	assert_int_equal(image_open_chain("mem:ovl", NULL, IMAGE_RDWR, NULL, &top), 0);
	assert_int_equal(disk_new(top, true, false, &c.disk), 0);
	c.events = events_new();
	assert_non_null(c.events);
	assert_int_equal(stream_new(c.disk, c.events, &c.job), 0);

	fetch_net_totals(&before);
	assert_int_equal(disk_read(c.disk, buf, 100000, 12345), 0);
	assert_memory_equal(buf, test_data + 12345, 100000);
	fetch_set_thread_class(FETCH_CLASS_JOB);
	assert_int_equal(disk_read(c.disk, buf, 300000, 3 * TEST_MIB + 7), 0);
	fetch_set_thread_class(FETCH_CLASS_GUEST);
	assert_memory_equal(buf, test_data + 3 * TEST_MIB + 7, 300000);
	fetch_net_totals(&after);
	guest = after.bytes[FETCH_CLASS_GUEST] - before.bytes[FETCH_CLASS_GUEST];
	job = after.bytes[FETCH_CLASS_JOB] - before.bytes[FETCH_CLASS_JOB];
	assert_true(guest >= 100000 && job >= 300000); /* whole clusters are copied */

	assert_int_equal(control_render(&c, CTL_STATUS, &text, &len), 0);
	text = realloc(text, len + 1);
	text[len] = '\0';
	assert_true(test_status_num(text, "net_bytes_guest") == after.bytes[FETCH_CLASS_GUEST]);
	assert_true(test_status_num(text, "net_bytes_job") == after.bytes[FETCH_CLASS_JOB]);
	assert_true(test_status_num(text, "network_bytes") == guest + job);
	assert_true(test_status_num(text, "net_requests") == after.requests);
	assert_true(test_status_num(text, "net_requests") > before.requests);
	assert_true(test_status_num(text, "net_requests_in_flight") == 0);
	assert_true(test_status_num(text, "net_errors") == after.errors);
	assert_true(test_status_num(text, "net_connections") >= 1);
	assert_true(test_status_num(text, "net_latency_p50_ms") > 0);
	assert_true(test_status_num(text, "net_latency_p50_ms") <=
		    test_status_num(text, "net_latency_p99_ms"));
	assert_true(test_status_num(text, "net_rtt_ms") >= 0);
	assert_true(test_status_num(text, "net_rtt_ms") <=
		    test_status_num(text, "net_latency_p50_ms"));
	assert_true(test_status_num(text, "net_rate_bytes_per_s") >= 0);
	free(text);

	assert_int_equal(control_render(&c, CTL_METRICS, &text, &len), 0);
	text = realloc(text, len + 1);
	text[len] = '\0';
	snprintf(url, sizeof(url), "\nstreamfs_net_fetched_bytes_total{class=\"job\"} %llu\n",
		 (unsigned long long)after.bytes[FETCH_CLASS_JOB]);
	assert_non_null(strstr(text, url));
	assert_null(strstr(text, "NaN")); /* every figure is known now */
	free(text);

	stream_free(c.job);
	assert_int_equal(disk_close(c.disk), 0);
	events_free(c.events);
	fetch_mem_reset();
	free(buf);
	tsrv_stop();
}

/* ---- throughput (only with STREAMFS_HTTP_BENCH=SIZE) ---- */

static double test_now_s(void)
{
	return (double)sfs_now_ns() / 1e9;
}

static void test_http_bench_nginx(void **state)
{
	const char *env = getenv("STREAMFS_HTTP_BENCH");
	struct fetch_options o = {.connect_timeout = 5, .io_timeout = 10, .retries = 2};
	size_t chunk = 4 * TEST_MIB;
	char path[600], url[128], cmd[800];
	uint64_t size, off;
	struct fetch_source *s;
	double t, t_fetch, t_curl, t_big;
	uint8_t *buf;
	int fd;

	if (!env || nginx_pid < 0 || sfs_parse_size(env, &size) < 0)
		skip();
	size = SFS_ALIGN_UP(size, chunk);
	snprintf(path, sizeof(path), "%s/www/big.bin", test_dir);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	assert_true(fd >= 0);
	for (off = 0; off < size; off += test_len) { /* random, in the page cache */
		size_t n = SFS_MIN(test_len, size - off);

		assert_int_equal(write(fd, test_data, n), (ssize_t)n);
	}
	close(fd);
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/big.bin", nginx_port);
	snprintf(cmd, sizeof(cmd), "curl -s -o /dev/null %s", url);
	assert_int_equal(system(cmd), 0); /* warm the page cache */

	fetch_set_options(&o);
	buf = malloc(32 * TEST_MIB);
	assert_non_null(buf);
	assert_int_equal(fetch_open(url, FETCH_RDONLY, &s), 0);
	t_fetch = t_big = t_curl = 1e9;
	for (int rep = 0; rep < 3; rep++) { /* best of 3, interleaved */
		t = test_now_s();
		for (off = 0; off < size; off += chunk)
			assert_int_equal(fetch_pread(s, buf, chunk, off), 0);
		t_fetch = SFS_MIN(t_fetch, test_now_s() - t);
		t = test_now_s();
		for (off = 0; off < size; off += 32 * TEST_MIB)
			assert_int_equal(
			    fetch_pread(s, buf, SFS_MIN(32 * TEST_MIB, size - off), off), 0);
		t_big = SFS_MIN(t_big, test_now_s() - t);
		t = test_now_s();
		assert_int_equal(system(cmd), 0);
		t_curl = SFS_MIN(t_curl, test_now_s() - t);
	}
	fetch_close(s);
	free(buf);
	fprintf(stderr,
		"bench: %llu MiB, best of 3: fetch_pread 4 MiB chunks %.0f MiB/s, 32 MiB chunks "
		"(split) %.0f MiB/s, curl -o /dev/null %.0f MiB/s; ratio 4 MiB/curl %.2f, "
		"32 MiB/curl %.2f\n",
		(unsigned long long)(size / TEST_MIB), (double)size / TEST_MIB / t_fetch,
		(double)size / TEST_MIB / t_big, (double)size / TEST_MIB / t_curl, t_curl / t_fetch,
		t_curl / t_big);
	unlink(path);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_http_read_chunks),
	    cmocka_unit_test(test_http_read_threads),
	    cmocka_unit_test(test_http_nginx_read_chunks),
	    cmocka_unit_test(test_http_nginx_read_threads),
	    cmocka_unit_test(test_http_nginx_404),
	    cmocka_unit_test(test_http_tls_verify),
	    cmocka_unit_test(test_http_retry_drop),
	    cmocka_unit_test(test_http_retry_503),
	    cmocka_unit_test(test_http_retry_429),
	    cmocka_unit_test(test_http_retry_500),
	    cmocka_unit_test(test_http_retry_stall),
	    cmocka_unit_test(test_http_retry_short),
	    cmocka_unit_test(test_http_no_content_length),
	    cmocka_unit_test(test_http_fail_503_forever),
	    cmocka_unit_test(test_http_fail_stall_forever),
	    cmocka_unit_test(test_http_fail_short_forever),
	    cmocka_unit_test(test_http_fail_bad_range),
	    cmocka_unit_test(test_http_fail_long_body),
	    cmocka_unit_test(test_http_fail_ignore_range),
	    cmocka_unit_test(test_http_fail_no_size),
	    cmocka_unit_test(test_http_fail_status),
	    cmocka_unit_test(test_http_fail_refused),
	    cmocka_unit_test(test_http_fail_url_credentials),
	    cmocka_unit_test(test_http_display_uri),
	    cmocka_unit_test(test_http_refusal_hides_secrets),
	    cmocka_unit_test(test_http_changed_if_match),
	    cmocka_unit_test(test_http_changed_etag),
	    cmocka_unit_test(test_http_changed_concurrent),
	    cmocka_unit_test(test_http_no_validator),
	    cmocka_unit_test(test_http_redirect),
	    cmocka_unit_test(test_http_auth_header),
	    cmocka_unit_test(test_http_auth_basic),
	    cmocka_unit_test(test_http_auth_cross_redirect),
	    cmocka_unit_test(test_http_pool_faults_exact),
	    cmocka_unit_test(test_http_pool_guest_first),
	    cmocka_unit_test(test_http_pool_guest_before_job),
	    cmocka_unit_test(test_http_control_status_net),
	    cmocka_unit_test(test_http_bench_nginx),
	};

	return cmocka_run_group_tests(tests, test_setup, test_teardown);
}
