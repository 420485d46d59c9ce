"""Load on running `caddtree serve` servers: requests/s, latency and time to first token, side by side.

    caddtree serve --method ar --port 8001 &
    caddtree serve --method caddtree --port 8002 &
    python benchmarks/serve_load.py --server ar=http://127.0.0.1:8001 --server caddtree=http://127.0.0.1:8002

Every request streams (so the first token's arrival is seen) a greedy chat reply to one of a few
prompts; the servers are measured one after the other with the same requests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import time

import httpx

PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a Python function that checks whether a number is prime.",
    "List three tips for staying focused while studying.",
    "What is the difference between weather and climate?",
]


def one_request(url: str, model: str, prompt: str, max_tokens: int, api_key: str | None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
    return {"latency": time.perf_counter() - start, "first_token": first or 0.0, "tokens": tokens}


def measure(url: str, requests: int, concurrency: int, max_tokens: int, api_key: str | None) -> dict:
    model = httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {api_key}"} if api_key else {},
                      timeout=30).json()["data"][0]["id"]
    one_request(url, model, PROMPTS[0], 8, api_key)  # warm-up
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda i: one_request(url, model, PROMPTS[i % len(PROMPTS)], max_tokens, api_key),
                                range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in results)
    return {
        "requests/s": requests / wall,
        "tokens/s": sum(r["tokens"] for r in results) / wall,
        "p50 latency s": statistics.median(latencies),
        "p95 latency s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "p50 first token s": statistics.median(r["first_token"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", required=True, metavar="LABEL=URL",
                        help="a running server, e.g. caddtree=http://127.0.0.1:8000 (repeat to compare)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--api-key")
    args = parser.parse_args()
    rows = {}
    for spec in args.server:
        label, _, url = spec.partition("=")
        rows[label] = measure(url.rstrip("/"), args.requests, args.concurrency, args.max_tokens, args.api_key)
    columns = list(next(iter(rows.values())))
    print("| server | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{row[column]:.2f}" for column in columns) + " |")


if __name__ == "__main__":
    main()
