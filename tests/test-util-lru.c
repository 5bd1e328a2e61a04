/* streamfs: unit tests for the LRU cache index (util/lru.c) under the
 * qcow2 metadata cache: lookups by key through hash collisions, recency
 * order and touch, eviction walks that skip entries the caller keeps
 * (pinned), nodes parked on a caller's own list (qcow2's dirty list) that
 * are still found by key and come back with touch, and destroy freeing
 * nodes on every list.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>

#include "lru.h"

struct test_entry {
	int value;
	bool pinned;
	struct lru_node node;
};

static int test_freed;

static struct test_entry *test_new(struct lru *c, uint64_t key, int value)
{
	struct test_entry *e = calloc(1, sizeof(*e));

	assert_non_null(e);
	e->value = value;
	lru_insert(c, &e->node, key);
	return e;
}

static int test_value(struct lru_node *n)
{
	return n ? lru_entry(n, struct test_entry, node)->value : -1;
}

static void test_free_node(struct lru_node *n)
{
	free(lru_entry(n, struct test_entry, node));
	test_freed++;
}

/* The LRU list from the oldest to the newest, as values, into out. */
static size_t test_order(const struct lru *c, int *out, size_t max)
{
	size_t k = 0;

	for (struct lru_node *n = lru_oldest(c); n && k < max; n = lru_newer(c, n))
		out[k++] = test_value(n);
	return k;
}

static void test_lru_find_by_key(void **state)
{
	struct lru c;

	/* Keys 64 KiB apart, as cluster offsets; 4 buckets force collisions. */
	assert_int_equal(lru_init(&c, 3, 16), 0);
	assert_int_equal(c.bucket_bits, 2);
	for (int i = 0; i < 100; i++)
		test_new(&c, (uint64_t)i << 16, i);
	assert_int_equal(c.count, 100);
	for (int i = 0; i < 100; i++)
		assert_int_equal(test_value(lru_find(&c, (uint64_t)i << 16)), i);
	assert_null(lru_find(&c, 100ULL << 16));
	assert_null(lru_find(&c, 1)); /* an unaligned key is simply absent */
	lru_destroy(&c, test_free_node);
}

static void test_lru_order_and_touch(void **state)
{
	struct lru c;
	int order[8];
	struct test_entry *a, *b;

	assert_int_equal(lru_init(&c, 64, 0), 0);
	assert_null(lru_oldest(&c));
	a = test_new(&c, 10, 1);
	b = test_new(&c, 20, 2);
	test_new(&c, 30, 3);
	assert_int_equal(test_order(&c, order, 8), 3);
	assert_int_equal(order[0], 1);
	assert_int_equal(order[1], 2);
	assert_int_equal(order[2], 3);
	/* lru_find does not reorder; lru_touch makes the node the newest. */
	lru_find(&c, 10);
	assert_int_equal(test_value(lru_oldest(&c)), 1);
	lru_touch(&c, &a->node);
	assert_int_equal(test_order(&c, order, 8), 3);
	assert_int_equal(order[0], 2);
	assert_int_equal(order[2], 1);
	assert_null(lru_newer(&c, &a->node));
	lru_touch(&c, &b->node);
	assert_int_equal(test_value(lru_oldest(&c)), 3);
	lru_destroy(&c, test_free_node);
}

static void test_lru_evict_skips_pinned(void **state)
{
	struct lru c;
	struct lru_node *n;
	int order[8];

	assert_int_equal(lru_init(&c, 16, 9), 0);
	for (int i = 0; i < 6; i++)
		test_new(&c, (uint64_t)i << 9, i)->pinned = (i == 0 || i == 2);
	/* Evict down to 3 entries, oldest first, keeping pinned ones, the way
	 * qcow2_cache_evict does. */
	n = lru_oldest(&c);
	while (c.count > 3 && n) {
		struct lru_node *newer = lru_newer(&c, n);
		struct test_entry *e = lru_entry(n, struct test_entry, node);

		if (!e->pinned) {
			lru_remove(&c, n);
			free(e);
		}
		n = newer;
	}
	assert_int_equal(c.count, 3);
	assert_int_equal(test_order(&c, order, 8), 3);
	assert_int_equal(order[0], 0);
	assert_int_equal(order[1], 2);
	assert_int_equal(order[2], 5);
	assert_null(lru_find(&c, 1ULL << 9));
	assert_null(lru_find(&c, 3ULL << 9));
	assert_int_equal(test_value(lru_find(&c, 2ULL << 9)), 2);
	lru_destroy(&c, test_free_node);
}

static void test_lru_parked_list(void **state)
{
	struct lru c;
	struct lru_node dirty, *n;
	struct test_entry *a, *b;
	int order[8], seen = 0;

	assert_int_equal(lru_init(&c, 8, 0), 0);
	lru_list_init(&dirty);
	a = test_new(&c, 1, 1);
	b = test_new(&c, 2, 2);
	test_new(&c, 3, 3);
	/* Parked nodes leave the LRU list but stay in the index. */
	lru_list_move(&dirty, &a->node);
	lru_list_move(&dirty, &b->node);
	assert_int_equal(test_order(&c, order, 8), 1);
	assert_int_equal(order[0], 3);
	assert_int_equal(c.count, 3);
	assert_ptr_equal(lru_find(&c, 1), &a->node);
	/* The parked list is most recently moved first. */
	lru_list_for_each (n, &dirty) {
		order[seen++] = test_value(n);
	}
	assert_int_equal(seen, 2);
	assert_int_equal(order[0], 2);
	assert_int_equal(order[1], 1);
	/* Back on the LRU list as the newest (qcow2_cache_clean). */
	lru_touch(&c, &a->node);
	assert_int_equal(test_order(&c, order, 8), 2);
	assert_int_equal(order[0], 3);
	assert_int_equal(order[1], 1);
	/* Removing a parked node works too. */
	lru_remove(&c, &b->node);
	free(b);
	assert_ptr_equal(dirty.next, &dirty);
	assert_int_equal(c.count, 2);
	lru_destroy(&c, test_free_node);
}

static void test_lru_destroy_frees_every_list(void **state)
{
	struct lru c, never = {0};
	struct lru_node dirty;

	assert_int_equal(lru_init(&c, 1, 0), 0);
	assert_int_equal(c.bucket_bits, 0); /* one chain */
	lru_list_init(&dirty);
	for (int i = 0; i < 5; i++) {
		struct test_entry *e = test_new(&c, (uint64_t)i, i);

		if (i % 2)
			lru_list_move(&dirty, &e->node);
	}
	assert_int_equal(test_value(lru_find(&c, 3)), 3);
	test_freed = 0;
	lru_destroy(&c, test_free_node);
	assert_int_equal(test_freed, 5);
	assert_null(c.buckets);
	lru_destroy(&never, test_free_node); /* never set up: nothing to do */
	assert_int_equal(test_freed, 5);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_lru_find_by_key),
	    cmocka_unit_test(test_lru_order_and_touch),
	    cmocka_unit_test(test_lru_evict_skips_pinned),
	    cmocka_unit_test(test_lru_parked_list),
	    cmocka_unit_test(test_lru_destroy_frees_every_list),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
