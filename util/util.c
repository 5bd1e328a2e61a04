/* streamfs: shared helpers (logging, size parsing, clocks). No state beyond
 * the log settings. URIs belong to the fetch layer (fetch/fetch.c). */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>

#include "util.h"

int sfs_log_level = SFS_LOG_WARN;
static bool sfs_use_syslog;

void sfs_log_to_syslog(bool on)
{
	if (on && !sfs_use_syslog)
		openlog("streamfs", LOG_PID, LOG_DAEMON);
	sfs_use_syslog = on;
}

void sfs_log(int level, const char *fmt, ...)
{
	static const int prio[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};
	char msg[1024];
	va_list ap;
	int saved = errno;

	if (level > sfs_log_level)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (sfs_use_syslog)
		syslog(prio[level < 0 ? 0 : level > 3 ? 3 : level], "%s", msg);
	else
		fprintf(stderr, "streamfs: %s\n", msg);
	errno = saved;
}

int sfs_parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	uint64_t mul = 1, r;

	if (!s || !*s || !isdigit((unsigned char)*s))
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno)
		return -EINVAL;
	switch (toupper((unsigned char)*end)) {
	case 'K':
		mul = 1ULL << 10;
		end++;
		break;
	case 'M':
		mul = 1ULL << 20;
		end++;
		break;
	case 'G':
		mul = 1ULL << 30;
		end++;
		break;
	case 'T':
		mul = 1ULL << 40;
		end++;
		break;
	default:
		break;
	}
	if (mul > 1 && (*end == 'i' || *end == 'I'))
		end++;
	if (*end == 'B' || *end == 'b')
		end++;
	while (*end == '\n' || *end == ' ')
		end++;
	if (*end)
		return -EINVAL;
	if (!sfs_mul_ok(v, mul, &r))
		return -EINVAL;
	*out = r;
	return 0;
}

/* The escape for byte c into e (4 bytes); returns its length. */
static size_t sfs_escape_one(unsigned char c, char *e)
{
	static const char hex[] = "0123456789abcdef";
	static const char named[][2] = {{'\\', '\\'}, {'\'', '\''}, {'\n', 'n'},
					{'\r', 'r'},  {'\t', 't'},  {'\0', '0'}};

	for (size_t i = 0; i < sizeof(named) / sizeof(named[0]); i++) {
		if (c == (unsigned char)named[i][0]) {
			e[0] = '\\';
			e[1] = named[i][1];
			return 2;
		}
	}
	if (c >= 0x20 && c < 0x7f) {
		e[0] = (char)c;
		return 1;
	}
	e[0] = '\\';
	e[1] = 'x';
	e[2] = hex[c >> 4];
	e[3] = hex[c & 15];
	return 4;
}

char *sfs_escape(char *buf, size_t size, const void *data, size_t len)
{
	const unsigned char *d = data;
	size_t n = 0, total = 0, room;
	char e[4];

	if (size == 0)
		return buf;
	for (size_t i = 0; i < len && total < size; i++)
		total += sfs_escape_one(d[i], e);
	/* All of it, or as many whole escapes as leave room for "...". */
	room = total >= size && size >= 4 ? size - 4 : size - 1;
	for (size_t i = 0; i < len; i++) {
		size_t elen = sfs_escape_one(d[i], e);

		if (n + elen > room)
			break;
		memcpy(buf + n, e, elen);
		n += elen;
	}
	if (total >= size && size >= 4) {
		memcpy(buf + n, "...", 3);
		n += 3;
	}
	buf[n] = '\0';
	return buf;
}

char *sfs_fmt_bytes(uint64_t n, char *buf, size_t len)
{
	static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
	double v = (double)n;
	int u = 0;

	while (v >= 1024 && u < 5) {
		v /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(buf, len, "%llu B", (unsigned long long)n);
	else
		snprintf(buf, len, "%.1f %s", v, units[u]);
	return buf;
}

uint64_t sfs_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

struct timespec sfs_deadline_ns(uint64_t ns)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	ns += (uint64_t)ts.tv_nsec;
	ts.tv_sec += (time_t)(ns / 1000000000ULL);
	ts.tv_nsec = (long)(ns % 1000000000ULL);
	return ts;
}

bool sfs_same_file(const char *a, const char *b)
{
	struct stat sa, sb;

	if (stat(a, &sa) < 0 || stat(b, &sb) < 0)
		return strcmp(a, b) == 0;
	return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

void sfs_wallclock(char *buf, size_t len)
{
	struct timespec ts;
	struct tm tm;
	char tmp[32];

	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(tmp, sizeof(tmp), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf, len, "%s.%03ldZ", tmp, ts.tv_nsec / 1000000);
}
