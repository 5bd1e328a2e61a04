/* libFuzzer harness: the control-file command parsers (control/control.c) and
 * sfs_parse_size (util/util.c). Besides memory errors it checks the parsers'
 * contracts: a START's base points into cmd.base and is NUL-terminated, a
 * pull length is never 0, and a parsed speed reads back the same in decimal.
 * It also resolves the input as a backing name stored in an image header
 * (fetch_resolve_uri), against file and URL parents and as the parent. */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control.h"
#include "fetch.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct control_stream_cmd cmd;
	uint64_t a, b, c;
	char num[32];
	char *s, *r0;

	sfs_log_level = -1;
	if (control_parse_stream((const char *)data, size, &cmd) == 0) {
		if (cmd.action != CTL_STREAM_START && (cmd.params.base || cmd.params.speed_set))
			abort(); /* only start takes arguments */
		if (cmd.params.base && cmd.params.base != cmd.base)
			abort(); /* base must point into the command itself */
		if (cmd.params.base && strnlen(cmd.base, sizeof(cmd.base)) >= sizeof(cmd.base))
			abort();
	}
	if (control_parse_speed((const char *)data, size, &a) == 0) {
		snprintf(num, sizeof(num), "%" PRIu64, a);
		if (control_parse_speed(num, strlen(num), &c) != 0 || c != a)
			abort();
	}
	if (control_parse_pull((const char *)data, size, &a, &b) == 0 && b == 0)
		abort();
	s = malloc(size + 1);
	if (!s)
		return 0;
	memcpy(s, data, size);
	s[size] = '\0';
	if (sfs_parse_size(s, &a) == 0) {
		snprintf(num, sizeof(num), "%" PRIu64, a);
		if (sfs_parse_size(num, &c) != 0 || c != a)
			abort();
	}
	for (size_t i = 0; i < 3; i++) {
		static const char *const parents[] = {"/img/t.qcow2", "http://h", "https://h/d/x"};
		char *r;
		int rc = fetch_resolve_uri(parents[i], s, &r);

		/* A string, or a clean -EINVAL (empty, not a URL) or -ENOMEM. */
		if (rc == 0 ? !r : r != NULL || (rc != -EINVAL && rc != -ENOMEM))
			abort();
		/* Against a path the name is kept whole, at the end (against a
		 * URL it is resolved per RFC 3986: dot segments go, bytes are
		 * %-encoded). */
		if (rc == 0 && i == 0 &&
		    (strlen(r) < strlen(s) || strcmp(r + strlen(r) - strlen(s), s) != 0))
			abort();
		free(r);
	}
	if (fetch_resolve_uri(s, "base.raw", &r0) == 0)
		free(r0);
	free(s);
	return 0;
}
