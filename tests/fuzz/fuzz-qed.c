/* libFuzzer harness: QED header, need-check recovery, L1/L2 tables. */
#include "fuzz-image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_image("qed", data, size);
	return 0;
}
