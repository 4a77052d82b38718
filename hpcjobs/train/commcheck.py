"""Job side of the ``commcheck`` stage: an all-reduce bandwidth test across the allocation.

Started by torchrun on every node (``python -m hpcjobs.train.commcheck``), one rank per
GPU (NCCL) or per requested fake GPU (gloo on CPU). For each message size it times
``iters`` all-reduces (after ``warmup``), takes the slowest rank's time and reports, as
nccl-tests defines them::

    algbw = size / time
    busbw = algbw * 2 (n - 1) / n        (n = ranks in the all-reduce)

in GB/s (1e9 bytes per second). The peak bus bandwidth (the best over the sizes,
normally the largest) is compared with ``--expected``; below it the check fails
(exit 1) with one ``hpcjobs.commcheck: error: ...`` line naming the slow node(s).

``--pairs``: every pair of nodes is also tested on its own (all ranks of both nodes),
and a node whose every pair is slow (or, failing that, the nodes in most slow pairs)
is named. Without ``--pairs`` a failure across more than two nodes tests the pairs
too, to name the node; with two nodes the pair is the whole allocation.

Results go to the log (a table per test) and to ``--out`` (JSON, written by rank 0).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist


def parse_size(text: str) -> int:
    """``1M``, ``64K``, ``1G`` or a byte count."""
    t = text.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def bus_factor(n: int) -> float:
    return 2.0 * (n - 1) / n if n > 1 else 0.0


def measure(sizes: Sequence[int], iters: int, warmup: int, device: torch.device,
            group=None, n: int = 1) -> List[Dict[str, float]]:
    """Time all-reduces of each size within ``group`` (every member calls this)."""
    out = []
    cuda = device.type == "cuda"
    for size in sizes:
        numel = max(1, size // 4)
        buf = torch.ones(numel, dtype=torch.float32, device=device)
        for _ in range(warmup):
            dist.all_reduce(buf, group=group)
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(buf, group=group)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)   # the slowest rank's time
        seconds = float(elapsed.item())
        nbytes = numel * 4
        algbw = nbytes / seconds / 1e9 if seconds > 0 else 0.0
        out.append({"size": nbytes, "time_us": round(seconds * 1e6, 2), "algbw": round(algbw, 4),
                    "busbw": round(algbw * bus_factor(n), 4)})
    return out


def peak(results: List[Dict[str, float]]) -> float:
    return max((r["busbw"] for r in results), default=0.0)


def table(title: str, results: List[Dict[str, float]]) -> str:
    lines = [f"commcheck: {title}", f"{'size (B)':>12} {'time (us)':>12} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13}"]
    for r in results:
        lines.append(f"{r['size']:>12} {r['time_us']:>12.2f} {r['algbw']:>13.4f} {r['busbw']:>13.4f}")
    return "\n".join(lines)


def slow_nodes_from_pairs(pairs: List[dict]) -> List[str]:
    """Nodes whose every pair is slow; else the nodes in the most slow pairs."""
    total: Dict[str, int] = {}
    slow: Dict[str, int] = {}
    for p in pairs:
        for node in p["nodes"]:
            total[node] = total.get(node, 0) + 1
            if not p["ok"]:
                slow[node] = slow.get(node, 0) + 1
    if not slow:
        return []
    always = [n for n in total if slow.get(n, 0) == total[n]]
    if always:
        return always
    most = max(slow.values())
    return [n for n, c in slow.items() if c == most]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcjobs.train.commcheck")
    ap.add_argument("--sizes", default="1M,16M,64M", help="message sizes, comma-separated (K, M, G suffixes)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--expected", type=float, default=None, help="expected peak bus bandwidth, GB/s")
    ap.add_argument("--pairs", action="store_true", help="also test every pair of nodes")
    ap.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"))
    ap.add_argument("--out", default=None, help="JSON results (rank 0)")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]

    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    hosts: List[Optional[str]] = [None] * world
    dist.all_gather_object(hosts, host)
    nodes: List[str] = list(dict.fromkeys(hosts))            # in rank order = allocation order
    ranks_of = {n: [r for r, h in enumerate(hosts) if h == n] for n in nodes}

    if rank == 0:
        print(f"commcheck: {backend} all-reduce, {world} rank(s) on {len(nodes)} node(s) ({', '.join(nodes)}), "
              f"{args.iters} iterations after {args.warmup} warm-up, sizes {', '.join(map(str, sizes))} B"
              + (f", expecting {args.expected:g} GB/s bus bandwidth" if args.expected is not None else ""),
              flush=True)
    results = measure(sizes, args.iters, args.warmup, device, None, world)
    best = peak(results)
    ok = args.expected is None or best >= args.expected
    if rank == 0:
        print(table(f"all {len(nodes)} node(s), {world} rank(s)", results), flush=True)
        print(f"commcheck: peak bus bandwidth {best:.4f} GB/s" + (
            f" (expected >= {args.expected:g} GB/s): {'ok' if ok else 'TOO SLOW'}" if args.expected is not None else ""),
            flush=True)

    pair_results: List[dict] = []
    test_pairs = len(nodes) >= 2 and (args.pairs or (not ok and len(nodes) > 2))
    if test_pairs:
        mine: List[dict] = []
        for a, b in itertools.combinations(nodes, 2):
            members = sorted(ranks_of[a] + ranks_of[b])
            group = dist.new_group(members)                   # every rank calls new_group, in the same order
            if rank in members:
                res = measure(sizes, args.iters, args.warmup, device, group, len(members))
                if rank == members[0]:
                    p = peak(res)
                    mine.append({"nodes": [a, b], "ranks": len(members), "results": res, "peak_busbw": p,
                                 "ok": args.expected is None or p >= args.expected})
            dist.barrier()
        gathered: List[Optional[list]] = [None] * world
        dist.all_gather_object(gathered, mine)
        order = {pair: i for i, pair in enumerate(itertools.combinations(nodes, 2))}
        pair_results = sorted((p for part in gathered for p in (part or [])),
                              key=lambda p: order[tuple(p["nodes"])])
        if rank == 0:
            for p in pair_results:
                print(table(f"pair {p['nodes'][0]} - {p['nodes'][1]}", p["results"]), flush=True)
                print(f"commcheck: pair {p['nodes'][0]} - {p['nodes'][1]}: peak bus bandwidth "
                      f"{p['peak_busbw']:.4f} GB/s{'' if p['ok'] else ' TOO SLOW'}", flush=True)
        ok = ok and all(p["ok"] for p in pair_results)

    slow: List[str] = []
    message = "ok"
    if not ok:
        slow = slow_nodes_from_pairs(pair_results) if pair_results else list(nodes)
        slow_pairs = [f"{p['nodes'][0]}-{p['nodes'][1]} {p['peak_busbw']:.4g}" for p in pair_results if not p["ok"]]
        message = (f"all-reduce bus bandwidth below the expected {args.expected:g} GB/s: peak {best:.4g} GB/s "
                   f"across {', '.join(nodes)}"
                   + (f"; slow pair(s) (GB/s): {', '.join(slow_pairs)}" if slow_pairs else "")
                   + f"; slow node(s): {', '.join(slow)}")
    if rank == 0:
        report = {"backend": backend, "world_size": world, "nodes": nodes,
                  "ranks_per_node": {n: len(r) for n, r in ranks_of.items()},
                  "iterations": args.iters, "warmup": args.warmup, "sizes": sizes,
                  "expected_busbw": args.expected, "results": results, "peak_busbw": best,
                  "pairs": pair_results, "ok": ok, "slow_nodes": slow, "message": message}
        if args.out:
            tmp = f"{args.out}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=2)
                fh.write("\n")
            os.replace(tmp, args.out)
        if ok:
            print("commcheck: passed", flush=True)
        else:
            print(f"hpcjobs.commcheck: error: {message}", file=sys.stderr, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
