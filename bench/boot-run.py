#!/usr/bin/env python3
"""Helpers of bench/boot.sh (the real-guest boot benchmark).

  boot-run.py boot LOG TIMEOUT_S QEMU_ARGS...
      Starts QEMU (QEMU_ARGS: the whole command line, without -serial and
      -qmp, which this adds), copies the guest's serial output to LOG and
      times QEMU start to the markers STREAMFS-BOOT-INIT and
      STREAMFS-BOOT-READY. At READY (or failure/timeout) it reads the
      drive's statistics over QMP (query-blockstats: what the guest read),
      then quits QEMU. Prints one line of key=value:
        result=ok|timeout|failed|exited init_s= ready_s= ready_epoch= rd_bytes= rd_ops=
      (ready_epoch: wall clock at READY). With BOOT_AT_READY=FILE in the
      environment, FILE (a control/status) is copied to LOG.at-ready at READY.
  boot-run.py table RESULTS IMAGE_BYTES
      The markdown table of bench/boot.sh's RESULTS (one boot a line,
      key=value; a line with note= marks a case that did not run), medians
      over runs, ratios to the local disk, the median time from the
      STREAMFS-BOOT-INIT marker to ready (python's imports: most of the
      disk reads, without the kernel's boot), then PASS/FAIL lines for the
      targets of issue #14.
  boot-run.py foreign-trace IN OUT
      A trace for the same image (IN's header kept, so it is accepted) whose
      ranges are IN's shifted by half the image: as many bytes as the boot
      needs, almost none of them the ones it reads.
  boot-run.py stale-trace IN OUT
      IN with another validator: what a trace of an earlier version of the
      image looks like.
"""
import json
import os
import select
import socket
import subprocess
import sys
import time

INIT = b"STREAMFS-BOOT-INIT"
READY = b"STREAMFS-BOOT-READY"
FAILED = b"STREAMFS-BOOT-FAILED"


class Qmp:
    def __init__(self, path, deadline):
        self.s = None
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                self.s = s
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.s.settimeout(10)
        self.f = self.s.makefile("rb")
        self._reply()  # greeting
        self.cmd("qmp_capabilities")

    def _reply(self):
        while True:
            line = self.f.readline()
            if not line:
                raise EOFError("QMP closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name, **args):
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self.s.sendall(json.dumps(req).encode() + b"\n")
        return self._reply()

    def close(self):
        if self.s:
            self.s.close()


def boot(log, timeout, qemu):
    qmp_path = log + ".qmp"
    try:
        os.unlink(qmp_path)
    except FileNotFoundError:
        pass
    args = qemu + ["-serial", "stdio", "-qmp", "unix:%s,server=on,wait=off" % qmp_path]
    res = {"result": "timeout", "init_s": "-", "ready_s": "-", "ready_epoch": "-", "rd_bytes": "-",
           "rd_ops": "-"}
    t0 = time.monotonic()
    deadline = t0 + timeout
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=open(log + ".err", "wb"))
    buf = b""
    with open(log, "wb") as out:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([p.stdout], [], [], min(left, 1.0))
            if not r:
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            now = time.monotonic()
            if not chunk:
                res["result"] = "exited"
                break
            out.write(chunk)
            buf = buf[-64:] + chunk
            if INIT in buf and res["init_s"] == "-":
                res["init_s"] = "%.3f" % (now - t0)
            if READY in buf:
                res["ready_s"] = "%.3f" % (now - t0)
                res["ready_epoch"] = "%.3f" % time.time()
                res["result"] = "ok"
                break
            if FAILED in buf:
                res["result"] = "failed"
                break
    if os.environ.get("BOOT_AT_READY"):
        # the daemon's counters at ready, before anything after the boot counts
        try:
            with open(os.environ["BOOT_AT_READY"], "rb") as src, open(log + ".at-ready", "wb") as dst:
                dst.write(src.read())
        except OSError as e:
            print("boot-run.py: %s" % e, file=sys.stderr)
    try:
        q = Qmp(qmp_path, time.monotonic() + 10)
        stats = q.cmd("query-blockstats").get("return", [])
        for dev in stats:
            st = dev.get("stats", {})
            if st.get("rd_operations", 0) > 0:
                res["rd_bytes"] = st["rd_bytes"]
                res["rd_ops"] = st["rd_operations"]
                break
        try:
            q.cmd("quit")
        except (OSError, EOFError):
            pass
        q.close()
    except (OSError, EOFError, ValueError):
        pass
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    print(" ".join("%s=%s" % kv for kv in res.items()))


def read_trace(path):
    with open(path) as f:
        lines = f.read().splitlines()
    head, ranges = lines[0], []
    fields = dict(x.split("=", 1) for x in head.split()[2:] if "=" in x)
    for ln in lines[1:]:
        ln = ln.strip()
        if ln and not ln.startswith("#"):
            off, length = ln.split()
            ranges.append((int(off), int(length)))
    return head, fields, ranges


def foreign_trace(src, dst):
    head, fields, ranges = read_trace(src)
    size, cluster = int(fields["size"]), int(fields["cluster"])
    shift = size // 2 // cluster * cluster
    with open(dst, "w") as f:
        f.write(head + "\n# foreign: bench/boot-run.py shifted every range by %d\n" % shift)
        for off, length in ranges:
            off = (off + shift) % (size // cluster * cluster)
            length = min(length, size // cluster * cluster - off)
            f.write("%d %d\n" % (off, length))


def stale_trace(src, dst):
    head, _, ranges = read_trace(src)
    words = [w for w in head.split() if not w.startswith("validator=")]
    words.append("validator=stale-%d" % os.getpid())
    with open(dst, "w") as f:
        f.write(" ".join(words) + "\n")
        for off, length in ranges:
            f.write("%d %d\n" % (off, length))


LABELS = [
    ("local", "raw file on local disk"),
    ("sfs-lo", "streamfs cold, loopback HTTP"),
    ("sfs-cold", "streamfs cold, far link"),
    ("sfs-trace", "streamfs, replayed trace, far link"),
    ("sfs-stale", "streamfs, stale trace (other validator), far link"),
    ("sfs-foreign", "streamfs, foreign trace (wrong ranges), far link"),
    ("qsd", "qemu-storage-daemon (http + COR + FUSE), far link"),
    ("sfs-stream", "streamfs cold, stream job running, far link"),
]


def median(v):
    v = sorted(v)
    return v[(len(v) - 1) // 2] if v else None


def mib(b):
    return "%.1f MiB" % (b / 1048576.0)


def table(path, image):
    runs, notes = {}, {}
    with open(path) as f:
        for line in f:
            kv = dict(w.split("=", 1) for w in line.split() if "=" in w)
            if "case" not in kv:
                continue
            if "note" in kv:
                notes[kv["case"]] = line.split("note=", 1)[1].strip()
            else:
                runs.setdefault(kv["case"], []).append(kv)

    def num(kv, k):
        try:
            return float(kv.get(k, "-"))
        except ValueError:
            return None

    med, refused, phase = {}, {}, {}
    print("| | time to ready | x local | + local | init to ready | HTTP requests | fetched | guest read"
          " | share of image | verify |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case, label in LABELS:
        rs = runs.get(case, [])
        if not rs:
            if case in notes:
                print("| %s | %s | | | | | | | | |" % (label, notes[case]))
            continue
        ok = [r for r in rs if r.get("result") == "ok"]
        if all(r.get("result") == "refused" for r in rs):
            refused[case] = rs[0].get("msg", "").replace("_", " ")
            print("| %s | refused at mount: %s | | | | | | | | |" % (label, refused[case]))
            continue
        t = median([num(r, "ready_s") for r in ok])
        med[case] = t
        bad = len(rs) - len(ok)
        ts = "%.1f s" % t if t is not None else "-"
        ts += " (%s)" % ", ".join(r["ready_s"] if r.get("result") == "ok" else r.get("result", "?")
                                   for r in rs)
        loc = med.get("local")
        x = "%.2f" % (t / loc) if t and loc else "-"
        plus = "%+.1f s" % (t - loc) if t and loc else "-"
        # the part of the boot that reads the root disk the most: the
        # kernel's boot before it is the same in every case, and noisy
        py = median([num(r, "ready_s") - num(r, "init_s") for r in ok if num(r, "init_s") is not None])
        pys = "%.1f s" % py if py is not None else "-"
        phase[case] = py
        req = median([num(r, "requests") for r in ok if num(r, "requests") is not None])
        rb = median([num(r, "req_bytes") for r in ok if num(r, "req_bytes") is not None])
        nb = median([num(r, "net_bytes") for r in ok if num(r, "net_bytes") is not None])
        fetched = nb if nb is not None else rb
        reqs = "-"
        if req:
            reqs = "%d (~%d KiB each)" % (req, rb / req / 1024) if rb else "%d" % req
        rd = median([num(r, "rd_bytes") for r in ok if num(r, "rd_bytes") is not None])
        ver = sorted(set(r.get("verify", "-") for r in rs))
        print("| %s | %s%s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            label, ts, " %d failed" % bad if bad else "", x, plus, pys, reqs,
            mib(fetched) if fetched is not None else "-", mib(rd) if rd else "-",
            "%.2f%%" % (100.0 * rd / image) if rd else "-", "/".join(ver)))
    print()
    loc = med.get("local")

    def verdict(name, cond, text):
        if cond is None:
            print("n/a  %s" % (text if text.startswith(name + ":") else name + ": " + text))
        else:
            print("%s %s: %s" % ("PASS" if cond else "FAIL", name, text))

    def ph(case, ref):
        # the same comparison for init to ready, which the kernel's noisy
        # boot does not blur
        a, b = phase.get(case), phase.get(ref)
        return "; init to ready %.1f vs %.1f s = %.2fx" % (a, b, a / b) if a and b else ""

    tr, cold, qsd = med.get("sfs-trace"), med.get("sfs-cold"), med.get("qsd")
    if tr and loc:
        verdict("trace", tr <= 1.3 * loc, "replayed trace %.1f s = %.2fx local (target <= 1.30x)%s" % (
            tr, tr / loc, ph("sfs-trace", "local")))
    else:
        verdict("trace", None, notes.get("sfs-trace", "needs the sfs-trace and local cases"))
    if cold and qsd:
        verdict("cold", cold < qsd, "streamfs cold %.1f s vs qemu-storage-daemon %.1f s, %.2fx local%s" % (
            cold, qsd, cold / loc if loc else float("nan"), ph("sfs-cold", "qsd")))
    else:
        verdict("cold", None, "needs the sfs-cold and qsd cases")
    for case in ("sfs-stale", "sfs-foreign"):
        t = med.get(case)
        if case in refused:
            # nothing read through it: the mount says why and fails
            verdict(case[4:], True, "refused at mount (%s): the guest cannot read through it" % refused[case])
        elif t and cold:
            vs = set(r.get("verify") for r in runs.get(case, []))
            verdict(case[4:], t <= 1.1 * cold and vs == {"ok"},
                    "%.1f s = %.2fx cold (target <= 1.10x)%s; overlay verify %s" % (
                        t, t / cold, ph(case, "sfs-cold"), "/".join(sorted(str(v) for v in vs))))
        else:
            verdict(case[4:], None, notes.get(case, "needs the %s and sfs-cold cases" % case))


def main():
    a = sys.argv[1:]
    if len(a) >= 4 and a[0] == "boot":
        boot(a[1], float(a[2]), a[3:])
    elif len(a) == 3 and a[0] == "table":
        table(a[1], int(a[2]))
    elif len(a) == 3 and a[0] == "foreign-trace":
        foreign_trace(a[1], a[2])
    elif len(a) == 3 and a[0] == "stale-trace":
        stale_trace(a[1], a[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
