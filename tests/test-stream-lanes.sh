#!/bin/bash
# The stream job with 8 chunks in flight (-o stream_depth=8), through the
# stream tests that check its bytes, its transitions (pause/resume/cancel,
# on-error=stop, base), guest writes racing it (fio verify, 8 racing
# threads), HTTP backings and status counters. The job picks its depth by
# measuring, and on loopback it measures 1: without this rerun the lanes
# would only ever run on far links.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
export SFS_STREAM_DEPTH=8
dir=$(cd "$(dirname "$0")" && pwd)
for t in test-stream test-stream-control test-stream-base test-fio-stream test-http-backing \
	test-concurrency test-status-counters; do
	start=$(date +%s)
	rc=0
	bash "$dir/$t.sh" >"$T/$t.log" 2>&1 || rc=$?
	[ $rc -eq 0 ] || { tail -20 "$T/$t.log" >&2; fail "$t with stream_depth=8: exit $rc"; }
	info "$t [$FMT] with stream_depth=8: ok ($(($(date +%s) - start)) s)"
done
echo "PASS: $TESTNAME"
