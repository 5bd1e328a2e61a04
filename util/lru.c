/* streamfs: the index of an LRU cache (see include/lru.h).
 *
 * Chained hashing with Fibonacci hashing of the key (multiply by 2^64/phi,
 * keep the top bits), which spreads the cluster-aligned file offsets the
 * caches use as keys evenly; the aligned low bits are shifted out first.
 * The recency list is a circular doubly-linked list through a sentinel, so
 * every move is O(1) and a node can change lists without knowing which
 * list it was on.
 */
#include <errno.h>
#include <stdlib.h>

#include "lru.h"

#define LRU_GOLDEN 0x9e3779b97f4a7c15ULL /* 2^64 / phi */

static size_t lru_bucket(const struct lru *c, uint64_t key)
{
	if (c->bucket_bits == 0)
		return 0;
	return (size_t)(((key >> c->key_shift) * LRU_GOLDEN) >> (64 - c->bucket_bits));
}

static void lru_unlink(struct lru_node *n)
{
	n->prev->next = n->next;
	n->next->prev = n->prev;
	n->prev = n->next = n;
}

static void lru_link_front(struct lru_node *head, struct lru_node *n)
{
	n->next = head->next;
	n->prev = head;
	head->next->prev = n;
	head->next = n;
}

int lru_init(struct lru *c, size_t min_buckets, unsigned key_shift)
{
	unsigned bits = 0;

	while (((size_t)1 << bits) < min_buckets && bits < 30)
		bits++;
	c->buckets = calloc((size_t)1 << bits, sizeof(*c->buckets));
	if (!c->buckets)
		return -ENOMEM;
	c->bucket_bits = bits;
	c->key_shift = key_shift;
	c->count = 0;
	lru_list_init(&c->list);
	return 0;
}

void lru_destroy(struct lru *c, void (*free_node)(struct lru_node *n))
{
	if (!c->buckets)
		return;
	for (size_t i = 0; i < ((size_t)1 << c->bucket_bits); i++) {
		struct lru_node *n = c->buckets[i];

		while (n) {
			struct lru_node *next = n->hnext;

			if (free_node)
				free_node(n);
			n = next;
		}
	}
	free(c->buckets);
	c->buckets = NULL;
	c->count = 0;
}

struct lru_node *lru_find(const struct lru *c, uint64_t key)
{
	struct lru_node *n;

	for (n = c->buckets[lru_bucket(c, key)]; n; n = n->hnext)
		if (n->key == key)
			return n;
	return NULL;
}

void lru_insert(struct lru *c, struct lru_node *n, uint64_t key)
{
	size_t b = lru_bucket(c, key);

	n->key = key;
	n->hnext = c->buckets[b];
	c->buckets[b] = n;
	lru_link_front(&c->list, n);
	c->count++;
}

void lru_remove(struct lru *c, struct lru_node *n)
{
	struct lru_node **pp = &c->buckets[lru_bucket(c, n->key)];

	while (*pp != n)
		pp = &(*pp)->hnext;
	*pp = n->hnext;
	n->hnext = NULL;
	lru_unlink(n);
	c->count--;
}

void lru_touch(struct lru *c, struct lru_node *n)
{
	lru_list_move(&c->list, n);
}

struct lru_node *lru_oldest(const struct lru *c)
{
	return c->list.prev == &c->list ? NULL : c->list.prev;
}

struct lru_node *lru_newer(const struct lru *c, const struct lru_node *n)
{
	return n->prev == &c->list ? NULL : n->prev;
}

void lru_list_init(struct lru_node *head)
{
	head->prev = head->next = head;
}

void lru_list_move(struct lru_node *head, struct lru_node *n)
{
	lru_unlink(n);
	lru_link_front(head, n);
}
