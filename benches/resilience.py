#!/usr/bin/env python3
"""Resilience check: what idle connections cost, latency under attack, single-input latency against a
baseline binary, memory over a mixed soak, and requests lost on SIGTERM.

Starts the release binary on a free loopback port and prints what held:
  1. threads and RSS with 5,000 idle connections open, and RSS growth per connection;
  2. p50/p99 of small good requests, quiet, then with the idle connections, a slowloris client (one
     header byte a second) and a body trickler open, then quiet again; the ratio of the p99 under attack
     to the quiet ones' mean (the target is at most 1.3);
  3. single-input latency at concurrency 1: HTTP p50/p99 measured by the client, and in-process p50 (the
     worker's own time, from the server's log line), for this binary and, with --baseline-binary, for
     another one (e.g. built from an earlier commit), both running at once and asked in alternation;
  4. RSS before and after a mixed soak (valid, invalid, huge, tiny requests) after warm-up;
  5. a closed-loop load interrupted by SIGTERM: requests answered, refused (new connections after the
     drain began) and lost (sent on an accepted connection, never answered) -- lost must be 0.

Loopback only, every loop bounded in count and time. Standard library only. Figures taken while other
processes use the cores are noisy: compare the ratios within one run.

    python3 benches/resilience.py [--binary target/release/embedding-server] [--baseline-binary OLD]
                                  [--idle-connections 5000] [--soak-seconds 600]
"""
import argparse
import http.client
import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"


def start_server(binary, extra, log=None):
    """Starts `binary serve` on a free port; with `log` (a list), its stderr lines are appended to it."""
    proc = subprocess.Popen([binary, "serve", "--port", "0", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if log is not None else subprocess.DEVNULL, text=True)
    if log is not None:
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    line = proc.stdout.readline()
    if not line.startswith("listening on http://"):
        proc.kill()
        sys.exit(f"the server did not start: {line!r}")
    port = int(line.strip().rsplit(":", 1)[1])
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    return proc, port


def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_own_fd_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard < wanted:
            sys.exit(f"{wanted} open files are needed; the hard limit is {hard} (ulimit -Hn)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def open_idle(port, count):
    sockets = []
    for _ in range(count):
        try:
            sockets.append(socket.create_connection((HOST, port), timeout=10))
        except OSError as e:
            print(f"  could open only {len(sockets)} connections: {e}")
            break
    return sockets


def wait_accepted(pid, before_fds, count, limit=60):
    """Waits until the server holds `count` more descriptors (its accepted connections)."""
    deadline = time.time() + limit
    while time.time() < deadline and open_fds(pid) - before_fds < count:
        time.sleep(0.2)
    return open_fds(pid) - before_fds


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))]


def post(conn, body, path="/v1/embeddings", content_type="application/json"):
    conn.request("POST", path, body=body, headers={"Content-Type": content_type})
    response = conn.getresponse()
    response.read()
    return response.status


def good_latencies(port, seconds, concurrency=4):
    """Closed-loop small good requests; returns latencies in ms and the error count."""
    latencies, errors = [], [0]
    lock = threading.Lock()
    deadline = time.time() + seconds
    body = json.dumps({"input": "a short sentence to embed"})

    def worker():
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        while time.time() < deadline:
            started = time.perf_counter()
            try:
                status = post(conn, body)
            except Exception:
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=30)
                status = None
            with lock:
                if status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0]


def attack(port, sockets, stop):
    """Next to the idle `sockets`, a slowloris head and a trickled body, kept going until `stop`."""

    def slowloris():
        while not stop.is_set():
            try:
                s = socket.create_connection((HOST, port), timeout=5)
                s.sendall(b"POST /v1/embeddings HTTP/1.1\r\n")
                while not stop.is_set():
                    s.sendall(b"X")
                    time.sleep(1)
            except OSError:
                time.sleep(0.2)  # closed by the server's header timeout: start again

    def trickler():
        while not stop.is_set():
            try:
                s = socket.create_connection((HOST, port), timeout=5)
                s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100000\r\n\r\n")
                while not stop.is_set():
                    s.sendall(b" ")
                    time.sleep(1)
            except OSError:
                time.sleep(0.2)

    for f in (slowloris, trickler):
        threading.Thread(target=f, daemon=True).start()


IN_PROCESS = re.compile(r"^POST /v1/embeddings 200 inputs=1 tokens=\d+ ([0-9.]+)ms")


def single_input_latency(servers, requests):
    """Single-input requests at concurrency 1, to each server in turn (alternating which goes first), on
    one kept-alive connection per server. Returns per server: client latencies (ms) and the worker's own
    times from its log (ms)."""
    body = json.dumps({"input": "a single sentence of ordinary length for the latency check"})
    conns = {name: http.client.HTTPConnection(HOST, port, timeout=30) for name, (port, _) in servers.items()}
    for conn in conns.values():
        for _ in range(20):  # warm-up
            post(conn, body)
    logged = {name: len(log) for name, (_, log) in servers.items()}
    latencies = {name: [] for name in servers}
    names = list(servers)
    for i in range(requests):
        for name in (names if i % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            status = post(conns[name], body)
            if status == 200:
                latencies[name].append((time.perf_counter() - started) * 1000)
    time.sleep(0.5)  # the last log lines
    result = {}
    for name, (_, log) in servers.items():
        inside = [float(m.group(1)) for line in log[logged[name]:] if (m := IN_PROCESS.match(line))]
        result[name] = (latencies[name], inside)
    for conn in conns.values():
        conn.close()
    return result


def soak(port, seconds):
    """Mixed traffic: valid, invalid, huge and tiny requests. Returns counts by status."""
    counts = {}
    lock = threading.Lock()
    deadline = time.time() + seconds
    words = "the quick brown fox jumps over the lazy dog while embeddings are computed".split()
    rng = random.Random(7)

    def body():
        kind = rng.random()
        if kind < 0.5:
            return json.dumps({"input": [" ".join(rng.choices(words, k=rng.randint(2, 40))) for _ in range(rng.randint(1, 8))]})
        if kind < 0.6:
            return json.dumps({"input": [" ".join(rng.choices(words, k=400)) for _ in range(32)]})
        if kind < 0.7:
            return json.dumps({"input": "x" * rng.randint(0, 3)})
        if kind < 0.8:
            return "{" * rng.randint(1, 5000)
        if kind < 0.9:
            return json.dumps({"input": [rng.randint(0, 40000) for _ in range(10)]})
        return "a" * (3 * 1024 * 1024)  # over the body limit

    def worker():
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        while time.time() < deadline:
            try:
                status = post(conn, body())
            except Exception:
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
                status = "conn"
            with lock:
                counts[status] = counts.get(status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def sigterm_check(binary):
    """Closed-loop load, SIGTERM after 2 s: every request sent on an accepted connection must be answered."""
    proc, port = start_server(binary, ["--shutdown-timeout", "30"])
    answered, refused, lost = [0], [0], [0]
    lock = threading.Lock()
    stop = threading.Event()
    body = json.dumps({"input": ["a sentence for the shutdown check"] * 4})

    def worker():
        while not stop.is_set():
            try:
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
                conn.connect()
            except OSError:
                with lock:
                    refused[0] += 1
                time.sleep(0.05)
                continue
            while not stop.is_set():
                try:
                    conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
                except OSError:
                    break  # the request never left: not sent, so not lost
                try:
                    response = conn.getresponse()
                    response.read()
                    with lock:
                        answered[0] += 1
                except http.client.RemoteDisconnected:
                    # Closed before answering. On a kept-alive connection this is the race every HTTP/1.1
                    # client retries; it counts as lost here, to be strict.
                    with lock:
                        lost[0] += 1
                    break
                except OSError:
                    with lock:
                        lost[0] += 1
                    break
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=40)
    exit_seconds = time.time() - signalled
    stop.set()
    for t in threads:
        t.join()
    return {"answered": answered[0], "refused_after_drain": refused[0], "lost": lost[0], "exit_code": code,
            "exit_seconds": round(exit_seconds, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "embedding-server"))
    parser.add_argument("--baseline-binary", help="another build to compare single-input latency with")
    parser.add_argument("--phase-seconds", type=float, default=10)
    parser.add_argument("--soak-seconds", type=float, default=60)
    parser.add_argument("--idle-connections", type=int, default=5000)
    parser.add_argument("--latency-requests", type=int, default=300)
    args = parser.parse_args()
    raise_own_fd_limit(args.idle_connections + 500)

    # Idle connections stay open for the whole attack phase.
    proc, port = start_server(args.binary, ["--idle-timeout", "600", "--header-timeout", "10"])
    try:
        good_latencies(port, 2)  # warm-up
        time.sleep(3)  # the heap is trimmed once traffic pauses
        threads_before, rss_before, fds_before = threads(proc.pid), rss_mib(proc.pid), open_fds(proc.pid)
        sockets = open_idle(port, args.idle_connections)
        accepted = wait_accepted(proc.pid, fds_before, len(sockets))
        time.sleep(1)
        threads_idle, rss_idle = threads(proc.pid), rss_mib(proc.pid)
        print(f"{len(sockets)} idle connections ({accepted} accepted):")
        print(f"  threads {threads_before} -> {threads_idle}; RSS {rss_before:.1f} -> {rss_idle:.1f} MiB: "
              f"{(rss_idle - rss_before) * 1024 * 1024 / max(1, accepted):.0f} bytes per connection")
        for s in sockets:
            s.close()
        time.sleep(1)

        quiet, quiet_errors = good_latencies(port, args.phase_seconds)
        stop = threading.Event()
        sockets = open_idle(port, args.idle_connections)
        attack(port, sockets, stop)
        time.sleep(1)
        attacked, attacked_errors = good_latencies(port, args.phase_seconds)
        stop.set()
        for s in sockets:
            s.close()
        time.sleep(1)
        quiet2, quiet2_errors = good_latencies(port, args.phase_seconds)
        print(f"latency, small requests at concurrency 4 ({args.phase_seconds:.0f} s each):")
        print(f"  quiet:        n={len(quiet):5d} errors={quiet_errors} p50={percentile(quiet, 50):6.1f} ms  p99={percentile(quiet, 99):6.1f} ms")
        print(f"  under attack: n={len(attacked):5d} errors={attacked_errors} p50={percentile(attacked, 50):6.1f} ms  p99={percentile(attacked, 99):6.1f} ms"
              f"  ({len(sockets)} idle connections + slowloris + body trickler)")
        print(f"  quiet again:  n={len(quiet2):5d} errors={quiet2_errors} p50={percentile(quiet2, 50):6.1f} ms  p99={percentile(quiet2, 99):6.1f} ms")
        quiet_p99 = (percentile(quiet, 99) + percentile(quiet2, 99)) / 2
        print(f"  p99 ratio (attack / mean of quiet): {percentile(attacked, 99) / quiet_p99:.2f} (target <= 1.3)")

        soak(port, min(20, args.soak_seconds / 5))  # warm-up: the allocator reaches its working set
        time.sleep(3)  # both readings are taken after the same pause, in which the server trims its heap
        before = rss_mib(proc.pid)
        counts = soak(port, args.soak_seconds)
        time.sleep(3)  # the server trims its heap once traffic pauses
        after = rss_mib(proc.pid)
        print(f"soak ({args.soak_seconds:.0f} s of mixed valid/invalid/huge/tiny requests): statuses {dict(sorted(counts.items(), key=str))}")
        print(f"  RSS after warm-up {before:.1f} MiB, after soak {after:.1f} MiB: growth {100 * (after - before) / before:+.1f}%")
    finally:
        proc.kill()
        proc.wait()

    binaries = {"this build": args.binary}
    if args.baseline_binary:
        binaries["baseline"] = args.baseline_binary
    servers, procs = {}, []
    try:
        for name, binary in binaries.items():
            log = []
            proc, port = start_server(binary, [], log)
            procs.append(proc)
            servers[name] = (port, log)
        results = single_input_latency(servers, args.latency_requests)
        print(f"single input at concurrency 1 ({args.latency_requests} requests each, servers asked in alternation):")
        for name, (http_ms, inside_ms) in results.items():
            print(f"  {name:10s}  HTTP p50={percentile(http_ms, 50):6.2f} ms p99={percentile(http_ms, 99):6.2f} ms"
                  f"   in-process p50={percentile(inside_ms, 50):6.2f} ms"
                  f"   HTTP overhead p50={percentile(http_ms, 50) - percentile(inside_ms, 50):5.2f} ms")
        if "baseline" in results:
            ratio = percentile(results["this build"][0], 50) / percentile(results["baseline"][0], 50)
            print(f"  HTTP p50 ratio (this build / baseline): {ratio:.2f}")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

    result = sigterm_check(args.binary)
    print(f"SIGTERM under load: {result}")
    if result["lost"] or result["exit_code"] != 0:
        sys.exit("FAILED: requests were lost or the exit code was not 0")


if __name__ == "__main__":
    main()
