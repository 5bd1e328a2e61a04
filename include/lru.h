/* streamfs: the index of an LRU cache: uint64_t keys hashed to intrusive
 * nodes, which sit on a most-recently-used-first list.
 *
 * Both table caches (qcow2 L2 tables and refcount blocks, QED L2 slices)
 * need the same three things: find an entry by its file offset, keep clean
 * entries in recency order, evict the oldest ones that may go. The policy
 * differs (qcow2 keeps pinned entries and parks dirty ones on a list of its
 * own; QED keeps dirty ones in place), so this index owns no entry and
 * evicts nothing by itself: callers embed a struct lru_node in their entry
 * (lru_entry() gets the entry back), walk from lru_oldest() towards
 * lru_newer(), and lru_remove() and free what may go. A node may be moved to
 * a caller's list (lru_list_move) and is still found by key; lru_touch()
 * brings it back to the front of the LRU list.
 *
 * The only allocation is the bucket array, made at lru_init(). Not
 * thread-safe: callers hold their cache lock around every call.
 */
#ifndef STREAMFS_LRU_H
#define STREAMFS_LRU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Embed in a cache entry. */
struct lru_node {
	uint64_t key;		      /* set by lru_insert() */
	struct lru_node *hnext;	      /* hash chain */
	struct lru_node *prev, *next; /* the list the node is on */
};

struct lru {
	struct lru_node **buckets; /* 1 << bucket_bits chains */
	unsigned bucket_bits;
	unsigned key_shift;   /* low key bits that never vary (alignment) */
	struct lru_node list; /* sentinel: most recently used first */
	size_t count;	      /* nodes in the index, on any list */
};

/* The entry of type 'type' whose member 'member' is node. */
#define lru_entry(node, type, member) ((type *)((char *)(node)-offsetof(type, member)))

/* Iterate over the nodes of a list, front to back; n must stay linked. */
#define lru_list_for_each(n, head) for ((n) = (head)->next; (n) != (head); (n) = (n)->next)

/* Set up an empty index of at least min_buckets hash chains (rounded up to
 * a power of two); keys are hashed after dropping key_shift low bits.
 * Returns 0 or -ENOMEM. */
int lru_init(struct lru *c, size_t min_buckets, unsigned key_shift) __attribute__((nonnull));

/* Call free_node (if not NULL) on every node in the index, whatever list it
 * is on, then free the bucket array. c may be zeroed and never set up. */
void lru_destroy(struct lru *c, void (*free_node)(struct lru_node *n)) __attribute__((nonnull(1)));

/* The node with this key, or NULL. Does not change the recency order. */
struct lru_node *lru_find(const struct lru *c, uint64_t key) __attribute__((nonnull));

/* Index n under key, at the front of the LRU list. The key must not be in
 * the index yet. */
void lru_insert(struct lru *c, struct lru_node *n, uint64_t key) __attribute__((nonnull));

/* Take n out of the index and off its list; the caller frees it. */
void lru_remove(struct lru *c, struct lru_node *n) __attribute__((nonnull));

/* Move n (from any list) to the front of the LRU list: just used. */
void lru_touch(struct lru *c, struct lru_node *n) __attribute__((nonnull));

/* The least recently used node on the LRU list, or NULL if it is empty. */
struct lru_node *lru_oldest(const struct lru *c) __attribute__((nonnull));

/* The node used next after n on the LRU list (towards the front), or NULL
 * if n is the most recent one. */
struct lru_node *lru_newer(const struct lru *c, const struct lru_node *n) __attribute__((nonnull));

/* Make head an empty list of the caller's own (e.g. dirty entries). */
void lru_list_init(struct lru_node *head) __attribute__((nonnull));

/* Move n from the list it is on to the front of the list at head. */
void lru_list_move(struct lru_node *head, struct lru_node *n) __attribute__((nonnull));

#endif /* STREAMFS_LRU_H */
