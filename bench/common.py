"""What every side-by-side benchmark shares: model folders, the matmul peak, machine load, TRL step clock.

The scripts run as `python bench/NAME.py`, so this module imports as `common`.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

THREADS = 2
DISTURBED_CORES = 0.3
"""Cores other processes may use during a timed run before its figures count as disturbed."""
SMOLLM2 = Path(__file__).resolve().parent.parent / ".cache/models/smollm2-135m-instruct"


def model_path(name: str, override: str | Path | None = None) -> Path:
    """`tiny` = the embedded default (built on first use), `smollm2` = the imported SmolLM2 folder."""
    if override:
        return Path(override)
    if name == "tiny":
        from posttrain.train.pretrain import ensure_default_model

        return ensure_default_model()
    if not (SMOLLM2 / "config.json").is_file():
        sys.exit(f"{SMOLLM2} is missing: run `bash scripts/get_smollm2.sh` once")
    return SMOLLM2


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 10) -> float:
    """Best GFLOP/s of a square n x n matmul on THREADS threads (after one warm-up)."""
    torch.set_num_threads(THREADS)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times[1:]) / 1e9


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Best read+write GB/s of copying an `mb` MB fp32 tensor on THREADS threads (a decode step reads
    every weight once, so weight bytes / this is the floor of a step's time)."""
    torch.set_num_threads(THREADS)
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def machine() -> dict:
    """The CPU model, its bf16 flags, the n=2048 matmul peaks, memory bandwidth and what `precision: auto`
    picks; measured in a subprocess, so its 1 GB copy does not raise the peak RSS that workers inherit."""
    code = "import json, common; print(json.dumps(common.measure_machine()))"
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def measure_machine() -> dict:
    from posttrain.train.precision import NATIVE_BF16_FLAGS, cpu_info, resolve

    cpu, flags = cpu_info()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "bf16_flags": [f for f in NATIVE_BF16_FLAGS if f in flags] or ["none"],
        "fp32_gflops": matmul_peak(torch.float32), "bf16_gflops": matmul_peak(torch.bfloat16),
        "bandwidth_gbs": memory_bandwidth_gbs(), "auto": resolve("auto", "cpu").precision,
    }  # fmt: skip


def machine_line(m: dict) -> str:
    return (f"{m['cpu']} ({m['cores']} cores, bf16 flags {'/'.join(m['bf16_flags'])}; {THREADS} threads: "
            f"fp32 {m['fp32_gflops']:.0f} / bf16 {m['bf16_gflops']:.0f} GFLOP/s, {m['bandwidth_gbs']:.1f} GB/s; "
            f"precision auto = {m['auto']})")  # fmt: skip


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB: VmHWM of /proc/self/status. Not ``ru_maxrss``: across exec it
    keeps the high-water mark of the forked parent's image (a worker started by a 1 GiB parent
    reported 1 GiB before doing anything)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: kB on most systems


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds used by our finished children) so far."""
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK"), ru.ru_utime + ru.ru_stime


def step_clock(ends: list[float]):
    """A transformers TrainerCallback appending a timestamp at train begin and after every step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    return StepClock()


def worker_env(tmp: Path) -> dict[str, str]:
    """The environment of a benchmark subprocess: THREADS threads, quiet progress, a private datasets cache."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    env.update(TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", HF_DATASETS_CACHE=str(tmp / "hf_cache"))
    return env


def run_worker(system: str, cmd: list[str], out: Path, env: dict[str, str]) -> dict | None:
    """Run one system's worker subprocess (log in out/log.txt); its out/result.json plus `wall_s` and
    `others`, the cores other processes used meanwhile (above ~0.3 the timings are disturbed; on a
    shared machine run with --nice -20). None, with the log's tail printed, when it failed."""
    t0, (busy0, ours0) = time.perf_counter(), busy_cpu_s()
    with (out / "log.txt").open("w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    (busy1, ours1), wall = busy_cpu_s(), time.perf_counter() - t0
    if rc != 0 or not (out / "result.json").is_file():
        print(f"{system} FAILED (rc {rc}); log tail:\n{(out / 'log.txt').read_text()[-3000:]}", flush=True)
        return None
    res = json.loads((out / "result.json").read_text())
    res["wall_s"], res["others"] = wall, max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall
    if res["others"] > DISTURBED_CORES:
        print(f"DISTURBED: other processes used {res['others']:.2f} cores during {system} "
              f"(> {DISTURBED_CORES}); its figures are not comparable", flush=True)  # fmt: skip
    return res
