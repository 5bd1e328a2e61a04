/* streamfs: small shared helpers: logging, overflow-checked arithmetic, byte order.
 *
 * Every module reports an error once, where it is detected, with context
 * (file, offset, field), through sfs_error(); the -errno travels up unchanged.
 */
#ifndef STREAMFS_UTIL_H
#define STREAMFS_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <endian.h>
#include <time.h>

#define STREAMFS_VERSION "0.1.0"

/* Log levels; messages at or below sfs_log_level are printed to stderr
 * (or syslog once the daemon has detached). */
enum sfs_log_level { SFS_LOG_ERROR = 0, SFS_LOG_WARN = 1, SFS_LOG_INFO = 2, SFS_LOG_DEBUG = 3 };
extern int sfs_log_level;

/* Print "streamfs: <message>" to stderr (or syslog when daemonized). */
void sfs_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Switch logging to syslog (after daemonizing). */
void sfs_log_to_syslog(bool on);

#define sfs_error(...) sfs_log(SFS_LOG_ERROR, __VA_ARGS__)
#define sfs_warn(...)  sfs_log(SFS_LOG_WARN, __VA_ARGS__)
#define sfs_info(...)  sfs_log(SFS_LOG_INFO, __VA_ARGS__)
#define sfs_debug(...) sfs_log(SFS_LOG_DEBUG, __VA_ARGS__)

/* a + b, false on overflow. */
static inline bool sfs_add_ok(uint64_t a, uint64_t b, uint64_t *r)
{
	return !__builtin_add_overflow(a, b, r);
}
/* a * b, false on overflow. */
static inline bool sfs_mul_ok(uint64_t a, uint64_t b, uint64_t *r)
{
	return !__builtin_mul_overflow(a, b, r);
}

#define SFS_MIN(a, b)	       ((a) < (b) ? (a) : (b))
#define SFS_MAX(a, b)	       ((a) > (b) ? (a) : (b))
#define SFS_DIV_ROUND_UP(n, d) (((n) + (d)-1) / (d))
/* Round down/up to a power-of-two alignment. */
#define SFS_ALIGN_DOWN(n, a) ((n) & ~((uint64_t)(a)-1))
#define SFS_ALIGN_UP(n, a)   SFS_ALIGN_DOWN((n) + (a)-1, (a))
#define SFS_IS_POW2(n)	     ((n) != 0 && ((n) & ((n)-1)) == 0)

/* Parse a size with an optional K/M/G/T suffix (binary units, optional
 * trailing "B" or "iB"). Returns 0 or -EINVAL; never accepts trailing junk. */
int sfs_parse_size(const char *s, uint64_t *out);

/* Render len bytes of untrusted data (a command written to a control file,
 * a name from an image header) as C-style escapes for a log line: printable
 * ASCII as is, \\ \' \n \r \t \0 and \xHH for the rest. Output stops at a
 * whole escape and ends in "..." when buf is too small (if "..." fits).
 * Returns buf, always NUL-terminated. */
char *sfs_escape(char *buf, size_t size, const void *data, size_t len);

/* Format bytes as "1.5 GiB" into buf. Returns buf. */
char *sfs_fmt_bytes(uint64_t n, char *buf, size_t len);

/* Monotonic clock in nanoseconds. */
uint64_t sfs_now_ns(void);
/* The CLOCK_MONOTONIC time ns from now, as the absolute timespec that
 * pthread_cond_timedwait() wants of a condvar set to that clock. */
struct timespec sfs_deadline_ns(uint64_t ns);
/* Whether a and b are the same file (device and inode), or, when either is
 * not a local file (a URL), the same string. */
bool sfs_same_file(const char *a, const char *b) __attribute__((nonnull));
/* Wall clock as "2026-11-22T08:35:43.123Z" into buf (>= 32 bytes). */
void sfs_wallclock(char *buf, size_t len);

#endif /* STREAMFS_UTIL_H */
