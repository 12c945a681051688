#!/usr/bin/python3
"""pyworkload: a self-verifying Python workload for cowmig tests.

State: a bytearray of 64 KiB blocks with a list gen[] (one int per block),
and a dict of NKEYS entries whose values are (int, str, int) tuples, about
200k Python objects that CPython's allocator keeps rewriting.

Step s (s = 0, 1, ...) rewrites block s % nblocks with expand(b, s) and
sets gen[b] = s; it also performs dict steps t = 4s .. 4s+3, each setting
d[t % NKEYS] = value(t % NKEYS, t). The initial fill writes every block and
every key once (block b with gen b, key k with t = k), so at any step
boundary, with S steps and T dict steps done:
  gen[b] = the largest g < S with g % nblocks == b, and the block holds
  expand(b, gen[b]);
  d[k] = value(k, the largest t < T with t % NKEYS == k).
Signal handlers only set flags; the main loop acts on them between steps.
With --port P a thread also serves one-line TCP requests on 0.0.0.0:P, in
the protocol of internal/ctrtest's kvserver (blocking accept, no epoll):
  GET      answered at once: "count <S> mib <MiB>"
  VERIFY   "verify ok count=<S> sum=<sha256 prefix>" or "verify FAIL ..."
  PAUSE    the main loop stops between steps: "paused count=<S> sum=<...>"
  RESUME   "resumed"; anything else "error unknown command".
  SIGUSR1: verify everything, print "verify ok step=<S> sha=<sha256 of the
           state>" or "verify FAIL <first failure> (bad=<n>)".
  SIGUSR2: print "counters step=<S> dictstep=<T>".
  SIGTERM, SIGINT: exit 0.
"""

import argparse
import hashlib
import os
import queue
import signal
import socket
import sys
import threading
import time

BLOCK = 64 * 1024
NKEYS = 65536
DICT_PER_STEP = 4


def expand(b, g):
    seed = hashlib.sha256(f"{b}:{g}".encode()).digest()
    return hashlib.shake_256(seed).digest(BLOCK)


def value(k, t):
    return (t, f"v{k}:{t}", (k * 2654435761 + t) & 0xFFFFFFFF)


def last_before(count, j, n):
    """The largest g < count with g % n == j (count >= n)."""
    return (count - 1) - ((count - 1 - j) % n)


def say(line):
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        pass


class Workload:
    def __init__(self, mib, rate):
        self.nblocks = max(1, mib * 1024 * 1024 // BLOCK)
        self.buf = bytearray(self.nblocks * BLOCK)
        self.gen = [0] * self.nblocks
        self.d = {}
        self.rate = rate
        self.corrupt_block = -1
        for b in range(self.nblocks):
            self.write_block(b, b)
        for k in range(NKEYS):
            self.d[k] = value(k, k)
        self.step = self.nblocks
        self.dstep = NKEYS
        # Flags set by signal handlers, read by the main loop.
        self.want_verify = False
        self.want_counters = False
        self.want_exit = False
        # TCP requests for the main loop: (command, reply queue).
        self.requests = queue.Queue()
        self.paused = False
        self.mib = mib

    def write_block(self, b, g):
        self.gen[b] = g
        if b != self.corrupt_block:
            self.buf[b * BLOCK:(b + 1) * BLOCK] = expand(b, g)

    def do_step(self):
        s = self.step
        self.write_block(s % self.nblocks, s)
        for t in range(self.dstep, self.dstep + DICT_PER_STEP):
            k = t % NKEYS
            self.d[k] = value(k, t)
        self.dstep += DICT_PER_STEP
        self.step = s + 1

    def corrupt(self):
        """Zero the block written last and stop rewriting it."""
        b = (self.step - 1) % self.nblocks
        self.corrupt_block = b
        self.buf[b * BLOCK:(b + 1) * BLOCK] = bytes(BLOCK)

    def verify(self):
        bad = 0
        first = ""
        view = memoryview(self.buf)
        for b in range(self.nblocks):
            g = last_before(self.step, b, self.nblocks)
            why = ""
            if self.gen[b] != g:
                why = f"block {b}: gen[] is {self.gen[b]}, expected {g}"
            elif view[b * BLOCK:(b + 1) * BLOCK] != expand(b, g):
                why = f"block {b}: content is not generation {g}"
            if why:
                bad += 1
                first = first or why
        if len(self.d) != NKEYS:
            bad += 1
            first = first or f"dict has {len(self.d)} keys, expected {NKEYS}"
        for k in range(NKEYS):
            want = value(k, last_before(self.dstep, k, NKEYS))
            got = self.d.get(k)
            if got != want:
                bad += 1
                first = first or f"dict key {k}: found {got!r}, expected {want!r}"
        if bad:
            return f"verify FAIL {first} (bad={bad})"
        h = hashlib.sha256()
        h.update(f"{self.step}:{self.dstep}:".encode())
        h.update(self.buf)
        h.update(",".join(map(str, self.gen)).encode())
        for k in range(NKEYS):
            h.update(repr(self.d[k]).encode())
        return f"verify ok step={self.step} sha={h.hexdigest()}"

    def tcp_answer(self, cmd):
        """Answers a TCP request between steps."""
        if cmd == "VERIFY" or cmd == "PAUSE":
            v = self.verify()
            if v.startswith("verify ok"):
                sha = v.split("sha=")[1][:16]
                v = f"verify ok count={self.step} sum={sha}"
                if cmd == "PAUSE":
                    self.paused = True
                    return f"paused count={self.step} sum={sha}"
            return v
        if cmd == "RESUME":
            self.paused = False
            return "resumed"
        return "error unknown command"

    def serve(self, port):
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", port))
        ls.listen(64)

        def loop():
            while True:
                try:
                    c, _ = ls.accept()
                except InterruptedError:
                    continue
                with c:
                    try:
                        cmd = c.makefile("r").readline().strip()
                        if cmd == "GET":
                            line = f"count {self.step} mib {self.mib}"
                        else:
                            reply = queue.Queue()
                            self.requests.put((cmd, reply))
                            line = reply.get()
                        c.sendall((line + "\n").encode())
                    except OSError:
                        pass

        threading.Thread(target=loop, daemon=True).start()

    def run(self):
        t0 = time.monotonic()
        done = 0
        while True:
            while self.paused or not self.requests.empty():
                try:
                    cmd, reply = self.requests.get(timeout=0.05 if self.paused else 0)
                except queue.Empty:
                    if self.want_exit:
                        os._exit(0)
                    continue
                reply.put(self.tcp_answer(cmd))
                t0, done = time.monotonic(), 0
            if self.want_exit:
                sys.stdout.flush()
                os._exit(0)
            if self.want_verify:
                self.want_verify = False
                say(self.verify())
            if self.want_counters:
                self.want_counters = False
                say(f"counters step={self.step} dictstep={self.dstep}")
            self.do_step()
            if self.rate <= 0:
                continue
            # Pace near rate steps per second. Reset when far behind (after
            # a verify or a freeze) or far ahead (the monotonic clock of a
            # restored clone need not match the source's).
            done += 1
            ahead = t0 + done / self.rate - time.monotonic()
            if ahead > 0.1 or ahead < -0.1:
                t0, done = time.monotonic(), 0
            elif ahead > 0.002:
                time.sleep(ahead)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mib", nargs="?", type=int, default=256, help="MiB of blocks (default 256)")
    ap.add_argument("--rate", type=int, default=1000, help="steps per second, 0 = unlimited")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ap.add_argument("--port", type=int, default=0, help="also serve TCP requests on this port")
    ap.add_argument("--selftest-corrupt", action="store_true",
                    help="zero one block after ready so that verify must fail")
    args = ap.parse_args()
    if args.mib < 1:
        ap.error("mib must be >= 1")

    w = Workload(args.mib, args.rate)

    def on_signal(signum, frame):
        if signum == signal.SIGUSR1:
            w.want_verify = True
        elif signum == signal.SIGUSR2:
            w.want_counters = True
        else:
            w.want_exit = True

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if not args.quiet:
        print(f"pyworkload: pid {os.getpid()}, {w.nblocks} blocks, {NKEYS} keys",
              file=sys.stderr, flush=True)
    if args.port:
        w.serve(args.port)
    say(f"ready {os.getpid()}")
    if args.selftest_corrupt:
        w.corrupt()
    w.run()


if __name__ == "__main__":
    main()
