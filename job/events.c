/* streamfs: event log (see events.h).
 *
 * THREAD MODEL: one mutex guards the ring and the sequence counter; blocked
 * readers wait on a condvar. The notify callback runs outside the lock. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "events.h"
#include "util.h"

struct events {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	char lines[EVENTS_RING][EVENTS_LINE]; /* protected by lock */
	uint64_t next;			      /* seq of the next event; protected by lock */
	bool shutdown;			      /* protected by lock */
	void (*notify)(void *);
	void *opaque;
};

struct events *events_new(void)
{
	struct events *ev = calloc(1, sizeof(*ev));

	if (!ev)
		return NULL;
	pthread_condattr_t ca;

	pthread_mutex_init(&ev->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&ev->cond, &ca);
	pthread_condattr_destroy(&ca);
	return ev;
}

void events_free(struct events *ev)
{
	if (!ev)
		return;
	pthread_mutex_destroy(&ev->lock);
	pthread_cond_destroy(&ev->cond);
	free(ev);
}

void events_set_notify(struct events *ev, void (*fn)(void *), void *opaque)
{
	pthread_mutex_lock(&ev->lock);
	ev->notify = fn;
	ev->opaque = opaque;
	pthread_mutex_unlock(&ev->lock);
}

void events_post(struct events *ev, const char *name, const char *fmt, ...)
{
	char ts[40], detail[EVENTS_LINE - 64];
	void (*fn)(void *);
	void *opaque;
	va_list ap;

	sfs_wallclock(ts, sizeof(ts));
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	/* Keep one event per line whatever the detail contains. */
	for (char *p = detail; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	pthread_mutex_lock(&ev->lock);
	snprintf(ev->lines[ev->next % EVENTS_RING], EVENTS_LINE, "%s %s%s%s\n", ts, name,
		 detail[0] ? " " : "", detail);
	ev->next++;
	fn = ev->notify;
	opaque = ev->opaque;
	pthread_cond_broadcast(&ev->cond);
	pthread_mutex_unlock(&ev->lock);
	sfs_info("event: %s %s", name, detail);
	if (fn)
		fn(opaque);
}

uint64_t events_cursor(struct events *ev)
{
	uint64_t c;

	pthread_mutex_lock(&ev->lock);
	c = ev->next;
	pthread_mutex_unlock(&ev->lock);
	return c;
}

bool events_ready(struct events *ev, uint64_t cursor)
{
	bool r;

	pthread_mutex_lock(&ev->lock);
	r = ev->next > cursor || ev->shutdown;
	pthread_mutex_unlock(&ev->lock);
	return r;
}

static void events_unlock(void *lock)
{
	pthread_mutex_unlock(lock);
}

size_t events_read(struct events *ev, uint64_t *cursor, char *buf, size_t len, int timeout_ms)
{
	struct timespec ts;
	volatile size_t n = 0;

	if (timeout_ms > 0)
		ts = sfs_deadline_ns((uint64_t)timeout_ms * 1000000ULL);
	pthread_mutex_lock(&ev->lock);
	/* libfuse cancels worker threads at unmount: don't die holding the lock. */
	pthread_cleanup_push(events_unlock, &ev->lock);
	while (timeout_ms != 0 && ev->next <= *cursor && !ev->shutdown) {
		if (timeout_ms < 0)
			pthread_cond_wait(&ev->cond, &ev->lock);
		else if (pthread_cond_timedwait(&ev->cond, &ev->lock, &ts) != 0)
			break;
	}
	pthread_cleanup_pop(0);
	if (ev->next > EVENTS_RING && *cursor < ev->next - EVENTS_RING) {
		int k = snprintf(buf, len, "lost %llu\n",
				 (unsigned long long)(ev->next - EVENTS_RING - *cursor));
		if (k > 0 && (size_t)k < len)
			n = (size_t)k;
		*cursor = ev->next - EVENTS_RING;
	}
	while (*cursor < ev->next) {
		const char *line = ev->lines[*cursor % EVENTS_RING];
		size_t l = strlen(line);
		if (n + l > len)
			break;
		memcpy(buf + n, line, l);
		n += l;
		(*cursor)++;
	}
	pthread_mutex_unlock(&ev->lock);
	return n;
}

bool events_is_shutdown(struct events *ev)
{
	bool r;

	pthread_mutex_lock(&ev->lock);
	r = ev->shutdown;
	pthread_mutex_unlock(&ev->lock);
	return r;
}

void events_shutdown(struct events *ev)
{
	pthread_mutex_lock(&ev->lock);
	ev->shutdown = true;
	pthread_cond_broadcast(&ev->cond);
	pthread_mutex_unlock(&ev->lock);
}
