#!/usr/bin/env python3
"""HTTP/1.1 server with Range support and fault injection, for tests/test-http.c.

Serves one file at /data, binds 127.0.0.1 on port 0 and writes the chosen port
to PORT_FILE (atomically, by rename). Python's http.server has no Range
support, so it is done here. Standard library only.

Faults apply to GET /data and are chosen with --mode at start or at any time
with GET /control?mode=M&count=N&after=K&retry_after=S&stall=S&ignore_if_match=0|1
(which also resets the request counter). The first K requests to /data are
served normally, the next N (-1 = all) get the fault. Modes:

  none          normal service
  drop          reset the connection without answering
  503, 500, 429 that status, with Retry-After: S (503 and 429)
  stall         wait S seconds before answering, then hang up
  stall-body    send the headers and half the body, wait S seconds, hang up
  bad-range     answer bytes a+1..b+1 labelled with the wrong Content-Range
  shifted       answer bytes a+1..b+1 with a *correct-looking* Content-Range
                for the request (undetectable lie; not used by the tests)
  short         announce the full Content-Length, send half, hang up
  short-cl      Content-Length and body are half of the range asked for
  long          send more bytes than asked for (Content-Length included)
  no-cl         no Content-Length: the body ends when the connection closes
  ignore-range  200 with the whole file
  no-size       Content-Range "bytes a-b/*"
  change        new content and a new ETag (stays changed; "count" ignored)
  404, 403, 401 that status
  no-validator  neither ETag nor Last-Modified

Other paths: /redirect-same (302 to /data), /redirect-cross (302 to
http://localhost:PORT/data, another origin), /redirect-loop, /redirect-ftp,
/stats (one line per request seen: "path host x-secret authorization"),
/control (above). The server exits when its parent process goes away.
"""

import argparse
import os
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

STATE_LOCK = threading.Lock()
STATE = {
    "mode": "none",
    "count": -1,
    "after": 0,
    "retry_after": 1,
    "stall": 5.0,
    "ignore_if_match": False,
    "seen": 0,  # /data requests since the last /control
    "changed": False,
    "log": [],
}
DATA = b""
DATA_CHANGED = b""
INVERT = bytes(255 - i for i in range(256))


def etag():
    return '"v2-%d"' % len(DATA) if STATE["changed"] else '"v1-%d"' % len(DATA)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "faultserver/1"

    def log_message(self, fmt, *args):
        pass

    def send_body(self, body):
        view = memoryview(body)
        for i in range(0, len(view), 1 << 20):
            self.wfile.write(view[i : i + (1 << 20)])

    def reset(self):
        # SO_LINGER 0: close() sends RST.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def simple(self, status, extra=None, body=b""):
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.send_body(body)

    def do_GET(self):
        try:
            self.route()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def route(self):
        url = urllib.parse.urlsplit(self.path)
        port = self.server.server_address[1]
        if url.path == "/control":
            return self.control(urllib.parse.parse_qs(url.query))
        if url.path == "/stats":
            with STATE_LOCK:
                body = "".join(l + "\n" for l in STATE["log"]).encode()
            return self.simple(200, body=body)
        with STATE_LOCK:
            STATE["log"].append(
                "%s %s %s %s"
                % (
                    url.path,
                    self.headers.get("Host", "-"),
                    (self.headers.get("X-Secret") or "-").replace(" ", "_"),
                    (self.headers.get("Authorization") or "-").replace(" ", "_"),
                )
            )
        if url.path == "/data":
            self.data()
        elif url.path == "/redirect-same":
            self.simple(302, {"Location": "/data"})
        elif url.path == "/redirect-cross":
            self.simple(302, {"Location": "http://localhost:%d/data" % port})
        elif url.path == "/redirect-loop":
            self.simple(302, {"Location": "/redirect-loop"})
        elif url.path == "/redirect-ftp":
            self.simple(302, {"Location": "ftp://127.0.0.1:%d/data" % port})
        else:
            self.simple(404, body=b"not found\n")

    def control(self, q):
        with STATE_LOCK:
            STATE["mode"] = q.get("mode", ["none"])[0]
            STATE["count"] = int(q.get("count", ["-1"])[0])
            STATE["after"] = int(q.get("after", ["0"])[0])
            STATE["retry_after"] = q.get("retry_after", ["1"])[0]
            STATE["stall"] = float(q.get("stall", ["5"])[0])
            STATE["ignore_if_match"] = q.get("ignore_if_match", ["0"])[0] == "1"
            STATE["seen"] = 0
            STATE["changed"] = False
            STATE["log"] = []
        self.simple(200, body=b"ok\n")

    def data(self):
        with STATE_LOCK:
            STATE["seen"] += 1
            n = STATE["seen"]
            mode = STATE["mode"]
            after, count = STATE["after"], STATE["count"]
            active = n > after and (count < 0 or n <= after + count)
            if mode == "change" and n > after:
                STATE["changed"] = True
            if not active:
                mode = "none"
            retry_after = STATE["retry_after"]
            stall = STATE["stall"]
            ignore_if_match = STATE["ignore_if_match"]
            data = DATA_CHANGED if STATE["changed"] else DATA
            tag = etag()
        size = len(data)

        if mode == "drop":
            return self.reset()
        if mode in ("503", "429"):
            return self.simple(int(mode), {"Retry-After": retry_after}, b"busy\n")
        if mode in ("500", "404", "403", "401"):
            return self.simple(int(mode), body=b"error\n")
        if mode == "stall":
            time.sleep(stall)
            return self.reset()

        validators = {} if mode == "no-validator" else {
            "ETag": tag,
            "Last-Modified": "Mon, 02 Jan 2006 15:04:05 GMT",
        }
        im = self.headers.get("If-Match")
        if im and not ignore_if_match and im.strip() != tag:
            return self.simple(412, body=b"precondition failed\n")

        rng = self.headers.get("Range")
        if mode == "ignore-range" or not rng:
            self.send_response(200)
            for k, v in validators.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return self.send_body(data)

        first, last = parse_range(rng, size)
        if first is None:
            return self.simple(416, {"Content-Range": "bytes */%d" % size})
        cr_first, cr_last, total = first, last, str(size)
        if mode in ("bad-range", "shifted"):
            first, last = first + 1, min(last + 1, size - 1)
            if mode == "bad-range":
                cr_first, cr_last = first, last
        if mode == "no-size":
            total = "*"
        body = data[first : last + 1]
        clen = len(body)
        if mode == "short-cl":
            body = body[: max(len(body) // 2, 0)]
            clen = len(body)
        elif mode == "long":
            body = body + b"X" * 4096
            clen = len(body)
        self.send_response(206)
        for k, v in validators.items():
            self.send_header(k, v)
        self.send_header("Content-Range", "bytes %d-%d/%s" % (cr_first, cr_last, total))
        if mode == "no-cl":
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(clen))
        self.end_headers()
        if mode == "short":
            self.send_body(body[: len(body) // 2])
            self.wfile.flush()
            return self.reset()
        if mode == "stall-body":
            self.send_body(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(stall)
            return self.reset()
        self.send_body(body)


def parse_range(h, size):
    """One range "bytes=a-b", "bytes=a-" or "bytes=-n"; (None, None) if unsatisfiable."""
    if not h.startswith("bytes=") or "," in h:
        return None, None
    a, _, b = h[6:].strip().partition("-")
    try:
        if a == "":
            n = int(b)
            first, last = max(size - n, 0), size - 1
        else:
            first = int(a)
            last = int(b) if b else size - 1
    except ValueError:
        return None, None
    last = min(last, size - 1)
    if first > last or first >= size:
        return None, None
    return first, last


class Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # Clients hang up on purpose (timeouts, refused answers): stay quiet.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def watch_parent(ppid, server):
    while os.getppid() == ppid:
        time.sleep(0.5)
    os._exit(0)


def main():
    global DATA, DATA_CHANGED
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--mode", default="none")
    args = ap.parse_args()
    with open(args.file, "rb") as f:
        DATA = f.read()
    DATA_CHANGED = DATA.translate(INVERT)
    STATE["mode"] = args.mode
    server = Server(("127.0.0.1", 0), Handler)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % server.server_address[1])
    os.rename(tmp, args.port_file)
    threading.Thread(target=watch_parent, args=(os.getppid(), server), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
