/* streamfs: unit tests for the bit set (include/bitset.h) that the format
 * drivers' overlap checks mark clusters in: single bits, ranges that report
 * an earlier mark but still set every bit, word boundaries, clear counts
 * with a partial last word, and the empty set.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "bitset.h"

static void test_bitset_starts_clear(void **state)
{
	struct bitset bs;

	assert_int_equal(bitset_init(&bs, 200), 0);
	for (uint64_t i = 0; i < 200; i++)
		assert_false(bitset_test(&bs, i));
	assert_int_equal(bitset_count_clear(&bs), 200);
	bitset_free(&bs);
}

static void test_bitset_test_and_set_returns_old_value(void **state)
{
	struct bitset bs;

	assert_int_equal(bitset_init(&bs, 130), 0);
	/* Both sides of the word boundaries. */
	static const uint64_t marks[] = {0, 63, 64, 127, 128, 129};

	for (size_t k = 0; k < sizeof(marks) / sizeof(marks[0]); k++)
		assert_false(bitset_test_and_set(&bs, marks[k]));
	assert_true(bitset_test_and_set(&bs, 63));
	assert_true(bitset_test_and_set(&bs, 64));
	assert_true(bitset_test_and_set(&bs, 129));
	assert_true(bitset_test(&bs, 0));
	assert_false(bitset_test(&bs, 1));
	assert_false(bitset_test(&bs, 65));
	assert_false(bitset_test(&bs, 126));
	assert_int_equal(bitset_count_clear(&bs), 130 - 6);
	bitset_free(&bs);
}

static void test_bitset_range_sets_all_and_reports_overlap(void **state)
{
	struct bitset bs;

	assert_int_equal(bitset_init(&bs, 256), 0);
	assert_false(bitset_test_and_set_range(&bs, 60, 70));
	/* Overlaps at 69 only: reported, and bits past it are still set. */
	assert_true(bitset_test_and_set_range(&bs, 69, 140));
	for (uint64_t i = 60; i < 140; i++)
		assert_true(bitset_test(&bs, i));
	assert_false(bitset_test(&bs, 59));
	assert_false(bitset_test(&bs, 140));
	/* Adjacent, not overlapping. */
	assert_false(bitset_test_and_set_range(&bs, 140, 141));
	/* Empty and reversed ranges do nothing. */
	assert_false(bitset_test_and_set_range(&bs, 10, 10));
	assert_false(bitset_test_and_set_range(&bs, 20, 10));
	assert_false(bitset_test(&bs, 10));
	assert_int_equal(bitset_count_clear(&bs), 256 - 81);
	bitset_free(&bs);
}

static void test_bitset_count_clear_ignores_spare_bits(void **state)
{
	struct bitset bs;

	/* 70 bits: the second word has 6 bits in the set and 58 spare. */
	assert_int_equal(bitset_init(&bs, 70), 0);
	bs.words[1] = UINT64_MAX; /* spare bits set must not count */
	assert_int_equal(bitset_count_clear(&bs), 64);
	bs.words[0] = UINT64_MAX;
	assert_int_equal(bitset_count_clear(&bs), 0);
	bitset_free(&bs);

	/* A whole number of words: there is a spare word, never counted. */
	assert_int_equal(bitset_init(&bs, 128), 0);
	bs.words[2] = UINT64_MAX;
	assert_int_equal(bitset_count_clear(&bs), 128);
	assert_false(bitset_test_and_set(&bs, 127));
	assert_int_equal(bitset_count_clear(&bs), 127);
	bitset_free(&bs);
}

static void test_bitset_empty_set(void **state)
{
	struct bitset bs;

	assert_int_equal(bitset_init(&bs, 0), 0);
	assert_non_null(bs.words);
	assert_int_equal(bitset_count_clear(&bs), 0);
	assert_false(bitset_test_and_set_range(&bs, 0, 0));
	bitset_free(&bs);
	assert_null(bs.words);
	bitset_free(&bs); /* twice is harmless */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_bitset_starts_clear),
	    cmocka_unit_test(test_bitset_test_and_set_returns_old_value),
	    cmocka_unit_test(test_bitset_range_sets_all_and_reports_overlap),
	    cmocka_unit_test(test_bitset_count_clear_ignores_spare_bits),
	    cmocka_unit_test(test_bitset_empty_set),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
