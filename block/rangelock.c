/* streamfs: byte-range locks (see rangelock.h).
 *
 * THREAD MODEL: one mutex and condvar guard the slot array; waiters are
 * woken on every unlock and recheck. Slots grow on demand. */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

#include "rangelock.h"

struct rangelock_slot {
	uint64_t off, end; /* [off, end) */
	bool used;
};

struct rangelock {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct rangelock_slot *slots; /* protected by lock */
	int nslots;		      /* protected by lock */
};

struct rangelock *rangelock_new(void)
{
	struct rangelock *rl = calloc(1, sizeof(*rl));

	if (!rl)
		return NULL;
	pthread_mutex_init(&rl->lock, NULL);
	pthread_cond_init(&rl->cond, NULL);
	return rl;
}

void rangelock_free(struct rangelock *rl)
{
	if (!rl)
		return;
	pthread_mutex_destroy(&rl->lock);
	pthread_cond_destroy(&rl->cond);
	free(rl->slots);
	free(rl);
}

/* Called with rl->lock held. */
static bool rangelock_busy(struct rangelock *rl, uint64_t off, uint64_t end)
{
	for (int i = 0; i < rl->nslots; i++)
		if (rl->slots[i].used && rl->slots[i].off < end && off < rl->slots[i].end)
			return true;
	return false;
}

int rangelock_lock(struct rangelock *rl, uint64_t off, uint64_t len)
{
	uint64_t end = off + len;
	int slot = -1;

	pthread_mutex_lock(&rl->lock);
	while (rangelock_busy(rl, off, end))
		pthread_cond_wait(&rl->cond, &rl->lock);
	for (int i = 0; i < rl->nslots; i++) {
		if (!rl->slots[i].used) {
			slot = i;
			break;
		}
	}
	if (slot < 0) {
		int n = rl->nslots ? rl->nslots * 2 : 16;
		struct rangelock_slot *s = realloc(rl->slots, (size_t)n * sizeof(*s));
		if (!s) {
			pthread_mutex_unlock(&rl->lock);
			return -ENOMEM;
		}
		for (int i = rl->nslots; i < n; i++)
			s[i].used = false;
		slot = rl->nslots;
		rl->slots = s;
		rl->nslots = n;
	}
	rl->slots[slot] = (struct rangelock_slot){.off = off, .end = end, .used = true};
	pthread_mutex_unlock(&rl->lock);
	return slot;
}

void rangelock_unlock(struct rangelock *rl, int slot)
{
	pthread_mutex_lock(&rl->lock);
	rl->slots[slot].used = false;
	pthread_cond_broadcast(&rl->cond);
	pthread_mutex_unlock(&rl->lock);
}
