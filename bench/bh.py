#!/usr/bin/env python3
"""Bench helpers for bench/run.sh (stdlib only).

  bh.py freeport
  bh.py qmp-stream SOCK DEVICE SPEED TIMEOUT [MARK]  block-stream, wait for completion;
                                               mark_t: when its offset first reached MARK
  bh.py qmp-cmd SOCK JSON                      one QMP command, print the reply
  bh.py sfs-stream MNT SPEED TIMEOUT [MARK]    start the streamfs job, wait for completion
  bh.py sfs-rate MNT SPEED SECS                start the job, print its rate over SECS, cancel
  bh.py fio JSONFILE                           print "iops p50_us p99_us"
  bh.py latwin CLATLOG T_START T_END T_KILL    idle/busy p50 p99 from a fio clat log
  bh.py latsamples CLATLOG [T_START T_END]     latencies (ms) of a fio clat log written with
                                               log_unix_epoch, completed within the window
  bh.py pcts FILE                              "p50 p99 n" of the numbers in FILE
  bh.py report RESULTS SIZE_MIB                print the table
"""
import json
import os
import socket
import statistics
import sys
import time


def freeport():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


class QMP:
    def __init__(self, path, timeout):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)
        # lines are split here, not by a makefile() reader: that one refuses
        # to read again once a read timed out, and timeouts poll the job
        self.buf = b""
        self.events = []
        self.recv()  # greeting
        self.cmd("qmp_capabilities")

    def recv(self):
        while b"\n" not in self.buf:
            b = self.s.recv(65536)
            if not b:
                raise EOFError("QMP socket closed")
            self.buf += b
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self.recv()
            if "event" in r:
                self.events.append(r)
                continue
            return r


def qmp_job_offset(q):
    """Progress of job s0 in bytes, or None."""
    r = q.cmd("query-block-jobs")
    for j in r.get("return", []):
        if j.get("device") == "s0":
            return j.get("offset")
    return None


def qmp_stream(sock, device, speed, timeout, mark=None):
    """With mark (bytes), also prints mark_t: the wall clock time at which the
    job's offset was first seen at or past mark (query-block-jobs, every 20 ms)."""
    timeout = float(timeout)
    mark = int(mark) if mark else None
    mark_t = None
    deadline = time.monotonic() + timeout
    try:
        q = QMP(sock, timeout)
        args = {"job-id": "s0", "device": device}
        if int(speed) > 0:
            args["speed"] = int(speed)
        t0 = time.monotonic()
        r = q.cmd("block-stream", args)
        if "error" in r:
            print("result=fail error=%s" % r["error"].get("desc", "?").replace(" ", "_"))
            return
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if mark is not None and mark_t is None:
                q.s.settimeout(min(left, 0.02))
            else:
                q.s.settimeout(max(0.01, left))
            try:
                ev = q.events.pop(0) if q.events else q.recv()
            except (socket.timeout, TimeoutError):
                if mark is None or mark_t is not None:
                    raise
                q.s.settimeout(max(0.01, left))
                off = qmp_job_offset(q)
                if off is not None and off >= mark:
                    mark_t = time.time()
                continue
            if ev.get("event") in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"):
                t1 = time.monotonic()
                if mark is not None and mark_t is None:
                    mark_t = time.time()
                d = ev.get("data", {})
                err = d.get("error", "-")
                ok = ev["event"] == "BLOCK_JOB_COMPLETED" and err == "-"
                print("result=%s elapsed_s=%.4f len=%s offset=%s error=%s%s" %
                      ("ok" if ok else "fail", t1 - t0, d.get("len"), d.get("offset"),
                       str(err).replace(" ", "_"),
                       " mark_t=%.4f" % mark_t if mark_t is not None else ""))
                return
    except (socket.timeout, TimeoutError):
        print("result=hang")
    except Exception as e:  # noqa
        print("result=fail error=%s" % str(e).replace(" ", "_"))


def qmp_cmd(sock, js):
    try:
        q = QMP(sock, 10)
        m = json.loads(js)
        print(json.dumps(q.cmd(m["execute"], m.get("arguments"))))
    except Exception as e:  # noqa
        print("error: %s" % e)


def read_status(mnt):
    st = {}
    try:
        with open(os.path.join(mnt, "control/status")) as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    st[k.strip()] = v.strip()
    except OSError:
        pass
    return st


def sfs_progress(mnt):
    try:
        with open(os.path.join(mnt, "control/progress")) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def sfs_stream(mnt, speed, timeout, mark=None):
    """With mark (bytes), also prints mark_t: the wall clock time at which
    control/progress (the first offset not yet copied) was first seen at or
    past mark."""
    timeout = float(timeout)
    mark = int(mark) if mark else None
    mark_t = None
    ctl = os.path.join(mnt, "control/stream")
    cmd = "start" + (" speed=%s" % speed if speed not in ("0", "") else "")
    t0 = time.monotonic()
    try:
        with open(ctl, "w") as f:
            f.write(cmd + "\n")
    except OSError as e:
        print("result=fail error=start:%s" % str(e).replace(" ", "_"))
        return
    state = "?"
    while time.monotonic() - t0 < timeout:
        try:
            with open(ctl) as f:
                state = f.read().strip()
        except OSError as e:
            state = "err:" + str(e)
        if state.split()[:1] and state.split()[0] in ("completed", "failed", "cancelled"):
            break
        if mark is not None and mark_t is None:
            off = sfs_progress(mnt)
            if off is not None and off >= mark:
                mark_t = time.time()
        time.sleep(0.005)
    else:
        print("result=hang state=%s" % state.replace(" ", "_"))
        return
    t1 = time.monotonic()
    if mark is not None and mark_t is None:
        mark_t = time.time()
    st = read_status(mnt)
    ok = state.startswith("completed")
    print("result=%s elapsed_s=%.4f avg_rate=%s copied=%s cor=%s network_bytes=%s "
          "status_elapsed=%s error=%s" %
          ("ok" if ok else "fail", t1 - t0, st.get("avg_rate_bytes_per_s", "-"),
           st.get("bytes_copied_by_job", "-"), st.get("bytes_copied_on_read", "-"),
           st.get("network_bytes", "-"), st.get("elapsed_s", "-"),
           st.get("error", "-").replace(" ", "_")) +
          (" mark_t=%.4f" % mark_t if mark_t is not None else ""))


def sfs_rate(mnt, speed, secs):
    """Achieved job rate in MiB/s: least-squares slope of control/progress
    offsets sampled every 0.2 s for secs, after 1 s of warm-up."""
    secs = float(secs)
    try:
        with open(os.path.join(mnt, "control/stream"), "w") as f:
            f.write("start speed=%s\n" % speed)
    except OSError as e:
        print("result=fail error=start:%s" % str(e).replace(" ", "_"))
        return
    time.sleep(1.0)
    pts = []
    end = time.monotonic() + secs
    try:
        while time.monotonic() < end:
            a = time.monotonic()
            with open(os.path.join(mnt, "control/progress")) as f:
                off = int(f.read().split()[0])
            pts.append(((a + time.monotonic()) / 2, off))
            time.sleep(0.2)
    except (OSError, ValueError, IndexError) as e:
        print("result=fail error=progress:%s" % str(e).replace(" ", "_"))
        return
    state = read_status(mnt).get("state", "?")
    try:
        with open(os.path.join(mnt, "control/stream"), "w") as f:
            f.write("cancel\n")
    except OSError:
        pass
    n = len(pts)
    mt, mo = sum(t for t, _ in pts) / n, sum(o for _, o in pts) / n
    den = sum((t - mt) ** 2 for t, _ in pts)
    if n < 3 or den <= 0 or state != "running":
        print("result=fail error=state:%s_samples:%d" % (state, n))
        return
    slope = sum((t - mt) * (o - mo) for t, o in pts) / den
    print("result=ok rate_mib=%.4f samples=%d" % (slope / 1048576, n))


def fio_parse(path):
    try:
        with open(path) as f:
            txt = f.read()
        # fio may print notes before the JSON object
        j = json.loads(txt[txt.index("{"):])
        job = j["jobs"][0]
        rd = job["read"]
        if job.get("error"):
            print("fail fail fail")
            return
        pct = rd["clat_ns"].get("percentile", {})
        p50 = pct.get("50.000000", 0) / 1000.0
        p99 = pct.get("99.000000", 0) / 1000.0
        print("%.1f %.1f %.1f" % (rd["iops"], p50, p99))
    except Exception:  # noqa
        print("fail fail fail")


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]


def latwin(log, t_start, t_end, t_kill):
    """fio clat log (log_avg_msec=0): 'ms, ns, ddir, bs, ...'. t_* are wall
    clock seconds; the last entry is taken as t_kill to align the clocks."""
    rows = []
    with open(log) as f:
        for line in f:
            p = line.split(",")
            if len(p) >= 2:
                rows.append((int(p[0]), int(p[1])))
    if not rows:
        print("fail fail fail fail fail 0 0")
        return
    off = float(t_kill) * 1000.0 - rows[-1][0]
    s = float(t_start) * 1000.0 - off
    e = float(t_end) * 1000.0 - off
    idle = [ns for ms, ns in rows if 200 <= ms < s]
    busy = [ns for ms, ns in rows if s <= ms <= e]
    f = lambda x: "%.1f" % (x / 1000.0) if x is not None else "fail"  # noqa
    iops = len(busy) / ((e - s) / 1000.0) if e > s else 0
    print(f(pct(idle, 50)), f(pct(idle, 99)), f(pct(busy, 50)), f(pct(busy, 99)), "%.0f" % iops,
          len(idle), len(busy))


def latsamples(log, t_start=None, t_end=None):
    """fio clat log with log_unix_epoch=1: 'ms since the epoch, ns, ...', one
    row per I/O at its completion. Prints the latencies in ms, one a line, of
    the I/Os completed within [t_start, t_end] (wall clock seconds) if given."""
    try:
        f = open(log)
    except OSError:
        return
    with f:
        for line in f:
            p = line.split(",")
            if len(p) < 2:
                continue
            ms, ns = int(p[0]), int(p[1])
            if t_start is not None and not float(t_start) * 1000.0 <= ms <= float(t_end) * 1000.0:
                continue
            print("%.3f" % (ns / 1e6))


def pcts(path):
    xs = []
    try:
        with open(path) as f:
            xs = [float(x) for x in f.read().split()]
    except (OSError, ValueError):
        pass
    if not xs:
        print("fail fail 0")
        return
    print("%.3f %.3f %d" % (pct(xs, 50), pct(xs, 99), len(xs)))


# ---------------------------------------------------------------- report

def load(path):
    vals = {}
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) < 2 or line.startswith("#"):
                continue
            vals.setdefault(p[0], []).append(p[1])
    return vals


def med(vals, key):
    """Median of the numeric values of key; else its first word (hang, n/a, fail)."""
    v = vals.get(key)
    if not v:
        return None
    nums = []
    for x in v:
        try:
            nums.append(float(x))
        except ValueError:
            pass
    if nums:
        return statistics.median(nums)
    return v[0]


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x >= 10 and x == int(x):  # counts, sizes
        return "%d" % x
    if x >= 1000:
        return "%.0f" % x
    if x >= 100:
        return "%.1f" % x
    if x >= 10:
        return "%.2f" % x
    return "%.3g" % x


def mib(x):
    """A requested speed for a label: 100, 8."""
    return "%g" % x if isinstance(x, float) else "?"


def ratio(a, b):
    if isinstance(a, float) and isinstance(b, float) and b > 0:
        return a / b
    return None


def report(path, size_mib):
    v = load(path)
    rows = [
        # label, key, limit key, limit label
        ("cold seq read dd 1M buffered (MiB/s)", "cold_seq", "floor.cold_seq", "floor"),
        ("cold seq read dd 1M iflag=direct (MiB/s)", "cold_seq_direct", "floor.cold_seq_direct", "floor"),
        ("  raw file, no FUSE, cold dd buffered (MiB/s)", None, "raw.cold_seq", "raw"),
        ("  raw file, no FUSE, cold dd direct (MiB/s)", None, "raw.cold_seq_direct", "raw"),
        ("cold 4K randread psync qd1 (IOPS)", "cold_rand_qd1", "floor.cold_rand_qd1", "floor"),
        ("cold 4K randread %s qd16 (IOPS)" % (v.get("aio_engine", ["io_uring"])[0]), "cold_rand_qd16",
         "floor.cold_rand_qd16", "floor"),
        ("  raw file, no FUSE, cold 4K psync qd1 (IOPS)", None, "raw.cold_rand_qd1", "raw"),
        ("  raw file, no FUSE, cold 4K qd16 (IOPS)", None, "raw.cold_rand_qd16", "raw"),
        ("warm seq read dd 1M buffered (MiB/s)", "warm_seq", "floor.warm_seq", "floor"),
        ("warm seq read dd 1M iflag=direct (MiB/s)", "warm_seq_direct", "floor.warm_seq_direct", "floor"),
        ("warm 4K randread psync qd1 (IOPS)", "warm_rand_qd1", "floor.warm_rand_qd1", "floor"),
        ("warm 4K randread %s qd16 (IOPS)" % (v.get("aio_engine", ["io_uring"])[0]), "warm_rand_qd16",
         "floor.warm_rand_qd16", "floor"),
        ("  warm 4K randread libaio qd16 (IOPS)", "warm_rand_libaio16", "floor.warm_rand_libaio16", "floor"),
        ("full stream, local backing, job (s)", "stream_local", "limit.cp_sync", "cp+sync"),
        ("full stream, local backing, job+sync (s)", "stream_local_sync", "limit.cp_sync", "cp+sync"),
        ("full stream, HTTP backing (MiB/s)", "stream_http", "limit.curl", "curl"),
        ("full stream, HTTP backing, job+sync (s)", "stream_http_sync", "limit.curl_file_sync",
         "curl -o+sync"),
        ("throttled stream speed=100M, achieved (MiB/s)", "throttle", "limit.throttle_req", "req"),
        ("  streamfs avg_rate_bytes_per_s (MiB/s)", "throttle_avg", "limit.throttle_req", "req"),
        ("throttled speed=%sM, CPU load, achieved (MiB/s)" % mib(med(v, "limit.throttle_req")),
         "throttle_load", "limit.throttle_req", "req"),
        ("throttled speed=8M, CPU load, achieved (MiB/s)", "throttle_load8", "limit.throttle_req8", "req"),
        ("guest 4K read p50 idle (us)", "lat_idle_p50", None, None),
        ("guest 4K read p99 idle (us)", "lat_idle_p99", None, None),
        ("guest 4K read p50 during stream (us)", "lat_busy_p50", None, None),
        ("guest 4K read p99 during stream (us)", "lat_busy_p99", None, None),
        ("  p99 busy/idle (x)", "lat_p99_ratio", None, None),
        ("  guest IOPS during stream", "lat_busy_iops", None, None),
        ("stream 64G sparse / 1G data (s)", "sparse_stream", None, None),
        ("daemon peak RSS VmHWM, sparse stream (MiB)", "rss_sparse", None, None),
        ("daemon CPU s during local stream", "stream_local_cpu_s", None, None),
        ("daemon peak RSS VmHWM, local stream (MiB)", "rss_local", None, None),
        ("daemon peak RSS VmHWM, HTTP stream (MiB)", "rss_http", None, None),
    ]
    links = wan_links(v)
    for rtt, rate, tag in links:
        w = "WAN %s ms/%s Mbit" % (rtt, rate)
        rows += [
            ("%s: full stream + sync (s)" % w, tag + ".stream", "limit.%s.capacity" % tag,
             "4 curls+sync"),
            ("  %s: stream job without the sync (s)" % w, tag + ".stream_job",
             "limit.%s.capacity_xfer" % tag, "4 curls"),
            ("  %s: network bytes of the stream (MiB)" % w, tag + ".net_mib", None, None),
            ("  %s: guest cold 4K read p50 idle (ms)" % w, tag + ".lat_idle_p50", None, None),
            ("  %s: guest cold 4K read p99 idle (ms)" % w, tag + ".lat_idle_p99", None, None),
            ("  %s: guest 4K read p50 during stream (ms)" % w, tag + ".lat_busy_p50", None, None),
            ("  %s: guest 4K read p99 during stream (ms)" % w, tag + ".lat_busy_p99", None, None),
            ("  %s: p99 busy/idle (x)" % w, tag + ".lat_p99_ratio", None, None),
            ("  %s: reads sampled idle" % w, tag + ".lat_idle_n", None, None),
            ("  %s: reads sampled during stream" % w, tag + ".lat_busy_n", None, None),
            ("  %s: stream job with the guest reading (s)" % w, tag + ".stream_busy", None, None),
        ]
    systems = ["streamfs", "qsd", "nbdkit"]
    hdr = ["workload", "streamfs", "qsd", "nbdkit", "limit", "sfs/qsd", "sfs/nbdkit", "sfs/limit"]
    table = []
    for label, key, lkey, llabel in rows:
        cells = [label]
        m = {}
        for s in systems:
            m[s] = med(v, "%s.%s" % (s, key)) if key else None
            cells.append(fmt(m[s]))
        lim = med(v, lkey) if lkey else None
        cells.append(fmt(lim) + (" (%s)" % llabel if lim is not None and llabel else ""))
        for r in (ratio(m["streamfs"], m["qsd"]), ratio(m["streamfs"], m["nbdkit"]),
                  ratio(m["streamfs"], lim)):
            cells.append("%.2f" % r if r is not None else "")
        if all(c in ("-", "") for c in cells[1:]):
            continue
        table.append(cells)
    w = [max(len(r[i]) for r in table + [hdr]) for i in range(len(hdr))]

    def line(r):
        return "| " + " | ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) + " |"
    print("streamfs benchmark: %s MiB random backing, medians of %s runs (time rows: lower is better)" %
          (size_mib, v.get("runs", ["?"])[0]))
    print(line(hdr))
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in table:
        print(line(r))

    # targets
    S = lambda k: med(v, "streamfs." + k)  # noqa
    Q = lambda k: med(v, "qsd." + k)  # noqa
    L = lambda k: med(v, k)  # noqa
    num = lambda *xs: all(isinstance(x, float) for x in xs)  # noqa
    out = []

    def target(name, ok, detail):
        mark = "n/a " if ok is None else ("PASS" if ok else "MISS")
        out.append("%s  %s: %s" % (mark, name, detail))

    t, cp, tq = S("stream_local_sync"), L("limit.cp_sync"), Q("stream_local_sync")
    target("full stream local <= 1.2x cp+sync", (t <= 1.2 * cp) if num(t, cp) else None,
           "%s s vs %s s (%s x)" % (fmt(t), fmt(cp), fmt(ratio(t, cp))))
    target("full stream local <= 0.8x qsd block-stream", (t <= 0.8 * tq) if num(t, tq) else None,
           "%s s vs %s s (%s x)" % (fmt(t), fmt(tq), fmt(ratio(t, tq))))
    h, c, hq = S("stream_http"), L("limit.curl"), Q("stream_http")
    target("full stream HTTP >= 0.8x curl", (h >= 0.8 * c) if num(h, c) else None,
           "%s MiB/s vs %s MiB/s (%s x)" % (fmt(h), fmt(c), fmt(ratio(h, c))))
    hq_ok = None
    if isinstance(h, float):
        hq_ok = (h > hq) if isinstance(hq, float) else (True if hq in ("hang", "fail") else None)
    target("full stream HTTP faster than qsd http", hq_ok,
           "%s MiB/s vs %s MiB/s" % (fmt(h), fmt(hq)))
    h, c = S("stream_http_sync"), L("limit.curl_file_sync")
    target("full stream HTTP (job+sync) no slower than curl -o FILE && sync",
           (h <= c) if num(h, c) else None,
           "%s s vs %s s (%s x)" % (fmt(h), fmt(c), fmt(ratio(h, c))))
    h, b = S("stream_http"), L("baseline.streamfs.stream_http")
    target("full stream HTTP no slower than the baseline (BENCH_BASELINE, 5% noise allowed)",
           (h >= 0.95 * b) if num(h, b) else None,
           "%s MiB/s vs %s MiB/s (%s x)" % (fmt(h), fmt(b), fmt(ratio(h, b))))
    for rtt, rate, tag in links:
        w = "WAN %s ms/%s Mbit" % (rtt, rate)
        lim = WAN_TARGETS.get((rtt, rate), 1.15)
        t, c = S(tag + ".stream"), L("limit.%s.capacity" % tag)
        target("%s: full stream <= %.2fx the link's capacity (4 curls + sync)" % (w, lim),
               (t <= lim * c) if num(t, c) else None,
               "%s s vs %s s (%s x)" % (fmt(t), fmt(c), fmt(ratio(t, c))))
        peers = [(p, med(v, "%s.%s.stream" % (p, tag))) for p in ("qsd", "nbdkit")]
        oks = [faster(t, x) for _, x in peers]
        target("%s: full stream faster than qsd and nbdkit" % w,
               None if None in oks else all(oks),
               "%s s vs %s" % (fmt(t), ", ".join("%s %s s" % (p, fmt(x)) for p, x in peers)))
        a = S(tag + ".lat_p99_ratio")
        target("%s: guest cold 4K p99 during unthrottled stream <= 1.3x idle" % w,
               (a <= 1.3) if num(a) else None,
               "%s ms vs %s ms idle (%s x, %s/%s reads); qsd %s x" %
               (fmt(S(tag + ".lat_busy_p99")), fmt(S(tag + ".lat_idle_p99")), fmt(a),
                fmt(S(tag + ".lat_busy_n")), fmt(S(tag + ".lat_idle_n")),
                fmt(Q(tag + ".lat_p99_ratio"))))
    a, b = S("cold_seq"), Q("cold_seq")
    target("cold seq read >= 1.5x qsd COR (buffered)", (a >= 1.5 * b) if num(a, b) else None,
           "%s vs %s MiB/s (%s x)" % (fmt(a), fmt(b), fmt(ratio(a, b))))
    a, b = S("cold_seq_direct"), Q("cold_seq_direct")
    target("cold seq read >= 1.5x qsd COR (direct)", (a >= 1.5 * b) if num(a, b) else None,
           "%s vs %s MiB/s (%s x)" % (fmt(a), fmt(b), fmt(ratio(a, b))))
    for k, n in (("warm_seq", "warm seq read buffered"), ("warm_seq_direct", "warm seq read direct"),
                 ("warm_rand_qd1", "warm 4K randread qd1"), ("warm_rand_qd16", "warm 4K randread qd16")):
        a, b = S(k), L("floor." + k)
        target("%s >= 0.9x FUSE floor" % n, (a >= 0.9 * b) if num(a, b) else None,
               "%s vs %s (%s x)" % (fmt(a), fmt(b), fmt(ratio(a, b))))
    a, r = S("throttle"), L("limit.throttle_req")
    target("speed limit within +-5% of requested", (abs(a - r) <= 0.05 * r) if num(a, r) else None,
           "achieved %s MiB/s (own timing) vs %s requested; avg_rate %s" %
           (fmt(a), fmt(r), fmt(S("throttle_avg"))))
    for k, rk in (("throttle_load", "limit.throttle_req"), ("throttle_load8", "limit.throttle_req8")):
        a, r = S(k), L(rk)
        target("speed limit %sM within +-5%% under CPU load" % mib(r),
               (abs(a - r) <= 0.05 * r) if num(a, r) else None,
               "achieved %s MiB/s (progress over time) vs %s requested, %s busy loops" %
               (fmt(a), fmt(r), fmt(L("limit.load_hogs"))))
    a = S("lat_p99_ratio")
    target("guest 4K p99 during unthrottled stream <= 2x idle",
           (a <= 2.0) if num(a) else None,
           "%s us vs %s us idle (%s x); qsd %s x" % (fmt(S("lat_busy_p99")), fmt(S("lat_idle_p99")),
                                                   fmt(a), fmt(Q("lat_p99_ratio"))))
    a = S("rss_sparse")
    target("daemon RSS <= 64 MiB (64G sparse stream)", (a <= 64) if num(a) else None,
           "%s MiB (all streamfs runs max: %s MiB)" % (fmt(a), fmt(maxall(v))))
    print("notes: dd/stream/curl rows are medians of %s runs; fio rows and the throttled stream run once;"
          % v.get("runs", ["?"])[0])
    print("  latency rows: medians of per-run p50/p99 from fio clat logs (psync qd1 on a copied region).")
    print("  limit column: 'floor' = qsd exporting the raw file over FUSE (no COR), 'raw' = the file without")
    print("  FUSE, cp+sync / curl / req as named. streamfs opens disk with keep_cache, so its warm buffered")
    print("  dd is served from the kernel page cache; the iflag=direct rows measure the daemon.")
    if links:
        print("  WAN rows: links emulated by bench/linkem (bench/wan.sh), %s MiB image, medians of %s"
              % (v.get("wan_size_mib", ["?"])[0], v.get("wan_runs", ["?"])[0]))
        print("  interleaved runs; every time includes a final sync. qsd: http driver + qcow2 overlay +")
        print("  copy-on-read + block-stream; nbdkit: curl plugin + cow filter (cow-on-read) pulled by")
        print("  nbdcopy to null: (each block is written once, to the cow overlay). Guest latency: psync")
        print("  qd1 O_DIRECT 4K random reads in the image's second half of a fresh overlay, samples")
        print("  pooled over the runs; 'during stream' counts the reads completed from the stream's start")
        print("  until its progress got within 32 MiB of that half, so every read counted is cold.")
    checks = []
    for k in sorted(v):
        if ".verify" in k:
            checks.append("%s=%s" % (k, ",".join(v[k])))
    if checks:
        print()
        print("data checks (cmp, qemu-img compare for WAN, against the backing): " + " ".join(checks))
    print()
    print("targets:")
    for o in out:
        print("  " + o)


# the ceilings for the WAN stream / link capacity ratio; other links get 1.15
WAN_TARGETS = {("80", "500"): 1.15, ("40", "200"): 1.1}


def wan_links(v):
    """[(rtt, rate, key tag)] from the 'wan_links 80:500,40:200' line."""
    out = []
    for l in (v.get("wan_links") or [""])[0].split(","):
        if ":" in l:
            rtt, rate = l.split(":", 1)
            out.append((rtt, rate, "wan_%s_%s" % (rtt.replace(".", "p"), rate.replace(".", "p"))))
    return out


def faster(t, peer):
    """streamfs time t beats the peer's: True/False, None if unknown."""
    if not isinstance(t, float):
        return False if t is not None else None
    if isinstance(peer, float):
        return t < peer
    return True if peer in ("hang", "fail") else None


def maxall(v):
    m = None
    for k, xs in v.items():
        if k.startswith("streamfs.rss"):
            for x in xs:
                try:
                    f = float(x)
                    m = f if m is None else max(m, f)
                except ValueError:
                    pass
    return m


def main():
    a = sys.argv[1:]
    if not a:
        print(__doc__)
        sys.exit(2)
    c = a[0]
    if c == "freeport":
        freeport()
    elif c == "qmp-stream":
        qmp_stream(*a[1:6])
    elif c == "qmp-cmd":
        qmp_cmd(a[1], a[2])
    elif c == "sfs-stream":
        sfs_stream(*a[1:5])
    elif c == "sfs-rate":
        sfs_rate(*a[1:4])
    elif c == "fio":
        fio_parse(a[1])
    elif c == "latwin":
        latwin(*a[1:5])
    elif c == "latsamples":
        latsamples(*a[1:4])
    elif c == "pcts":
        pcts(a[1])
    elif c == "report":
        report(a[1], a[2])
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
