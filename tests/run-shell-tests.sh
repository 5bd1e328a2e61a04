#!/bin/bash
# Run every tests/test-*.sh. Tests marked "# formats: qcow2 qed" on a line
# of their own run once per format with FMT set. Summarises pass/skip/fail;
# exits non-zero if any failed. Logs go to $LOGDIR/streamfs-log-TEST-FMT.txt
# (LOGDIR defaults to /tmp).
cd "$(dirname "$0")"
logdir=${LOGDIR:-/tmp}
pass=0 skipn=0 failn=0 failed=()
only=${TESTS:-}
for t in test-*.sh; do
	[ -n "$only" ] && [[ " $only " != *" ${t%.sh} "* ]] && continue
	if [ -n "${LONG:-}" ] || ! grep -q '^# long-only' "$t"; then :; else continue; fi
	fmts=$(sed -n 's/^# formats: //p' "$t")
	for f in ${fmts:-qcow2}; do
		start=$(date +%s)
		FMT=$f timeout 600 bash "$t" >"$logdir/streamfs-log-${t%.sh}-$f.txt" 2>&1
		rc=$?
		dur=$(($(date +%s) - start))
		case $rc in
		0) pass=$((pass + 1)); echo "PASS: $t [$f] (${dur}s)" ;;
		77) skipn=$((skipn + 1)); echo "SKIP: $t [$f]: $(grep SKIP "$logdir/streamfs-log-${t%.sh}-$f.txt" | tail -1)" ;;
		*) failn=$((failn + 1)); failed+=("$t[$f]"); echo "FAIL: $t [$f] (exit $rc, ${dur}s)"; tail -30 "$logdir/streamfs-log-${t%.sh}-$f.txt" | sed 's/^/    /' ;;
		esac
	done
done
echo "shell tests: $pass passed, $skipn skipped, $failn failed ${failed[*]}"
[ $failn -eq 0 ]
