#!/usr/bin/env python3
"""Resilience check: latency under attack, memory over a mixed soak, and requests lost on SIGTERM.

Starts the release binary on a free loopback port and prints what held:
  1. p50/p99 of small good requests, alone and then with 1,000 idle connections, a slowloris client
     (one header byte a second) and a body trickler open at the same time;
  2. RSS before and after a mixed soak (valid, invalid, huge, tiny requests) after warm-up;
  3. a closed-loop load interrupted by SIGTERM: requests answered, refused (new connections after the
     drain began) and lost (sent on an accepted connection, never answered) -- lost must be 0.

Loopback only, every loop bounded in count and time. Standard library only.

    python3 benches/resilience.py [--binary target/release/embedding-server] [--soak-seconds 600]
"""
import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"


def start_server(binary, extra):
    proc = subprocess.Popen([binary, "serve", "--port", "0", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on http://"):
        proc.kill()
        sys.exit(f"the server did not start: {line!r}")
    port = int(line.strip().rsplit(":", 1)[1])
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    return proc, port


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


def attack(port, idle_connections, stop):
    """Opens idle connections, a slowloris head and a trickled body, and keeps them going until `stop`."""
    sockets = []
    for _ in range(idle_connections):
        try:
            sockets.append(socket.create_connection((HOST, port), timeout=5))
        except OSError:
            break

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

    threads = [threading.Thread(target=f, daemon=True) for f in (slowloris, trickler)]
    for t in threads:
        t.start()
    return sockets, len(sockets)


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
    parser.add_argument("--phase-seconds", type=float, default=10)
    parser.add_argument("--soak-seconds", type=float, default=60)
    parser.add_argument("--idle-connections", type=int, default=1000)
    args = parser.parse_args()

    proc, port = start_server(args.binary, ["--idle-timeout", "30", "--header-timeout", "10"])
    try:
        good_latencies(port, 2)  # warm-up
        quiet, quiet_errors = good_latencies(port, args.phase_seconds)
        stop = threading.Event()
        sockets, opened = attack(port, args.idle_connections, stop)
        time.sleep(1)
        attacked, attacked_errors = good_latencies(port, args.phase_seconds)
        stop.set()
        for s in sockets:
            s.close()
        print(f"latency, small requests at concurrency 4 ({args.phase_seconds:.0f} s each):")
        print(f"  quiet:        n={len(quiet):5d} errors={quiet_errors} p50={percentile(quiet, 50):6.1f} ms  p99={percentile(quiet, 99):6.1f} ms")
        print(f"  under attack: n={len(attacked):5d} errors={attacked_errors} p50={percentile(attacked, 50):6.1f} ms  p99={percentile(attacked, 99):6.1f} ms"
              f"  ({opened} idle connections + slowloris + body trickler)")
        print(f"  p99 ratio (attack/quiet): {percentile(attacked, 99) / percentile(quiet, 99):.2f}")

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

    result = sigterm_check(args.binary)
    print(f"SIGTERM under load: {result}")
    if result["lost"] or result["exit_code"] != 0:
        sys.exit("FAILED: requests were lost or the exit code was not 0")


if __name__ == "__main__":
    main()
