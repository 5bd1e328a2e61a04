/* libFuzzer harness: the control-file command parsers and size parsing. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "control.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct control_stream_cmd cmd;
	uint64_t a, b;
	char *s;

	sfs_log_level = -1;
	if (control_parse_stream((const char *)data, size, &cmd) == 0 && cmd.params.base &&
	    strlen(cmd.params.base) >= sizeof(cmd.base))
		abort(); /* base must point into cmd.base, NUL-terminated */
	control_parse_speed((const char *)data, size, &a);
	control_parse_pull((const char *)data, size, &a, &b);
	s = malloc(size + 1);
	if (!s)
		return 0;
	memcpy(s, data, size);
	s[size] = '\0';
	sfs_parse_size(s, &a);
	free(s);
	return 0;
}
