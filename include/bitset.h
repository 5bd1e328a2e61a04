/* streamfs: a fixed-size bit set (header only).
 *
 * The format drivers' consistency checks at open mark every host cluster a
 * table references and look for one marked twice (qcow2-check.c, and the
 * QED check): one bit per cluster of the file. The set is sized once;
 * indexes past nbits are a caller bug (asserted), so callers clamp ranges to
 * what they track, as the checks do for clusters past the end of the file.
 * Not thread-safe: the checks run before the image is shared.
 */
#ifndef STREAMFS_BITSET_H
#define STREAMFS_BITSET_H

#include <assert.h>
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

struct bitset {
	uint64_t *words; /* bit i is bit i % 64 of words[i / 64] */
	uint64_t nbits;
};

/* Allocate a set of nbits bits, all clear. Returns 0 or -ENOMEM. */
static inline int bitset_init(struct bitset *bs, uint64_t nbits)
{
	bs->nbits = nbits;
	/* One word more than needed, so nbits == 0 still allocates. */
	bs->words = calloc(nbits / 64 + 1, sizeof(uint64_t));
	return bs->words ? 0 : -ENOMEM;
}

/* Free the set (an unallocated, zeroed one too). */
static inline void bitset_free(struct bitset *bs)
{
	free(bs->words);
	bs->words = NULL;
	bs->nbits = 0;
}

/* Is bit i set? */
static inline bool bitset_test(const struct bitset *bs, uint64_t i)
{
	assert(i < bs->nbits);
	return (bs->words[i / 64] >> (i % 64)) & 1;
}

/* Set bit i; return its old value. */
static inline bool bitset_test_and_set(struct bitset *bs, uint64_t i)
{
	bool was = bitset_test(bs, i);

	bs->words[i / 64] |= 1ULL << (i % 64);
	return was;
}

/* Set bits [first, end) (none if first >= end); return true if any of them
 * was set already. Every bit is set, even after the first one found. */
static inline bool bitset_test_and_set_range(struct bitset *bs, uint64_t first, uint64_t end)
{
	bool dup = false;

	for (uint64_t i = first; i < end; i++)
		dup |= bitset_test_and_set(bs, i);
	return dup;
}

/* Number of clear bits among the nbits. */
static inline uint64_t bitset_count_clear(const struct bitset *bs)
{
	uint64_t set = 0;

	for (uint64_t w = 0; w < bs->nbits / 64; w++)
		set += (uint64_t)__builtin_popcountll(bs->words[w]);
	if (bs->nbits % 64)
		set += (uint64_t)__builtin_popcountll(bs->words[bs->nbits / 64] &
						      ((1ULL << (bs->nbits % 64)) - 1));
	return bs->nbits - set;
}

#endif /* STREAMFS_BITSET_H */
