"""Throughput of the code sandbox: trivial programs per second (the last line printed).

    python bench/sandbox_throughput.py [N] [WORKERS]

Each program defines a function and passes one assert; every run builds and tears down
its own namespaces (user, mount, pid, net, ipc, uts). Target: >= 20 programs/s on 2 cores.
"""

from __future__ import annotations

import os
import sys
import time

from posttrain.rewards.sandbox import Program, SandboxConfig, choose_isolation, run_programs


def main(n: int = 200, workers: int = 4) -> float:
    """Run ``n`` trivial programs ``workers`` at a time; returns programs per second."""
    config = SandboxConfig(workers=workers)
    print(f"isolation: {choose_isolation(config)}, cpus: {os.cpu_count()}, workers: {workers}, programs: {n}")
    programs = [Program(f"def f(x):\n    return x + {i}", [f"assert f(1) == {i + 1}"]) for i in range(n)]
    start = time.perf_counter()
    results = run_programs(programs, config)
    elapsed = time.perf_counter() - start
    bad = [r for r in results if r.reason != "ok"]
    if bad:
        raise SystemExit(f"{len(bad)} programs failed, e.g. {bad[0]}")
    rate = n / elapsed
    print(f"{n} programs in {elapsed:.2f} s")
    print(f"{rate:.1f} programs/s")
    return rate


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
