/* libFuzzer harness: qcow2 header, extensions, L1/L2/refcount tables. */
#include "fuzz-image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_image("qcow2", data, size);
	return 0;
}
