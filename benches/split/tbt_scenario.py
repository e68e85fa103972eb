#!/usr/bin/env python3
"""Decode's time between tokens while long prompts arrive (BENCHMARKS.md, phase splitting).

One streamed completion decodes GEN tokens; once it has produced WARM tokens, LONG prompts of
PROMPT tokens each arrive (max_tokens 1..8). The decoding stream's gaps between tokens are
timed at the client: p50, p90, p99 and max over the gaps while the long prompts are being
prefilled (from their arrival to the last one's first token), and over the whole stream; the
long prompts' time to first token too. Prints one JSON line.

Usage: tbt_scenario.py URL [--gen 160] [--warm 16] [--prompt 1024] [--long 2] [--vocab 32000]
Standard library only.
"""
import argparse, http.client, json, random, sys, threading, time, urllib.parse


def stream(url, body, on_token):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"{url}: {r.status} {r.read()[:300]!r}")
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            raise SystemExit(f"{url}: {ev['error']}")
        if ev["choices"] and ev["choices"][0].get("text"):
            on_token(time.monotonic())


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def main():
    a = argparse.ArgumentParser()
    a.add_argument("url")
    a.add_argument("--gen", type=int, default=160)
    a.add_argument("--warm", type=int, default=16)
    a.add_argument("--prompt", type=int, default=1024)
    a.add_argument("--long", type=int, default=2)
    a.add_argument("--vocab", type=int, default=32000)
    a = a.parse_args()
    rng = random.Random(7)
    times, warm = [], threading.Event()
    window = {}

    def tok(t):
        times.append(t)
        if len(times) >= a.warm:
            warm.set()

    body = {"prompt": [1] + [rng.randrange(3, a.vocab) for _ in range(8)], "max_tokens": a.gen,
            "ignore_eos": True, "temperature": 0, "stream": True}
    decoder = threading.Thread(target=stream, args=(a.url, body, tok))
    decoder.start()
    if not warm.wait(600):
        raise SystemExit("the decoding stream did not start")
    window["start"] = time.monotonic()
    ttfts = []

    def long_prompt(i):
        t0 = time.monotonic()
        first = []
        body = {"prompt": [1] + [rng.randrange(3, a.vocab) for _ in range(a.prompt - 1)], "max_tokens": 1 + i,
                "ignore_eos": True, "temperature": 0, "stream": True}
        stream(a.url, body, lambda t: first.append(t))
        ttfts.append(first[0] - t0)
        window.setdefault("ends", []).append(first[0])

    longs = [threading.Thread(target=long_prompt, args=(i,)) for i in range(a.long)]
    for t in longs:
        t.start()
    for t in longs:
        t.join()
    decoder.join()
    end = max(window["ends"])
    gaps = [(b - a_, b) for a_, b in zip(times, times[1:])]
    during = [g * 1e3 for g, t in gaps if window["start"] <= t <= end]
    every = [g * 1e3 for g, _ in gaps]
    out = {
        "tokens": len(times),
        "gaps_during_prefill": len(during),
        "tbt_ms_during": {p: round(pct(during, p), 1) for p in (50, 90, 99)} | {"max": round(max(during, default=0), 1)},
        "tbt_ms_all": {p: round(pct(every, p), 1) for p in (50, 90, 99)} | {"max": round(max(every), 1)},
        "long_prompt_ttft_s": [round(t, 2) for t in sorted(ttfts)],
        "window_s": round(end - window["start"], 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
