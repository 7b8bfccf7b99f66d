"""Shared helpers for the benchmarks: machine/version info, fp32 matmul peak, timing, peak RSS, tables.

Every bench imports from here so that figures from different benches are comparable: the same timing rule
(warm-up calls, then the median of timed repeats, each call blocked until its result is ready), the same
matmul-peak probe and the same record of the machine and library versions the numbers came from.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (or platform.processor() elsewhere)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.lower().startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
  """The SIMD-relevant CPU flags (avx2, avx512*, amx*, fma), for reading matmul peaks."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        flags = line.split(":", 1)[1].split()
        return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
  except OSError:
    pass
  return []


def load_average() -> list[float] | None:
  """1/5/15-minute load averages; compare with the core count to judge whether timings were contended."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


class CpuMonitor:
  """How busy this process's CPUs were with *other* processes between two snapshots (Linux /proc/stat).

  `other_cores(a, b)` = (busy time of the CPUs this process may run on - this process's CPU time) / wall time, in
  cores. On a 2-core machine 0.0 means the timing ran alone and ~1.0 means another process kept one core busy
  throughout. Only the CPUs in this process's affinity mask count (so under `taskset -c 0` the other core is
  ignored). Hypervisor steal time counts as busy (time this VM's CPUs did not run us). Returns None where
  /proc/stat is unavailable.
  """

  _TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

  @staticmethod
  def _cpus() -> set[str] | None:
    try:
      return {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (AttributeError, OSError):
      return None

  @staticmethod
  def snapshot() -> tuple[float, float | None, float]:
    own = os.times()
    cpus = CpuMonitor._cpus()
    try:
      busy = 0.0
      for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu"):
          break
        if (cpus is None and name == "cpu") or (cpus is not None and name in cpus):
          ticks = [int(x) for x in fields]
          # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
          busy += (sum(ticks[:8]) - ticks[3] - ticks[4]) / CpuMonitor._TICK
    except (OSError, ValueError, IndexError):
      busy = None
    return time.perf_counter(), busy, own.user + own.system

  @staticmethod
  def other_cores(a: tuple, b: tuple) -> float | None:
    wall = b[0] - a[0]
    if a[1] is None or b[1] is None or wall <= 0:
      return None
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall)


def _version(module: str) -> str | None:
  try:
    mod = __import__(module)
  except Exception:  # noqa: BLE001 - a missing or broken optional library is just "not installed"
    return None
  return getattr(mod, "__version__", "unknown")


def machine_info() -> dict[str, Any]:
  """Machine, thread settings and library versions, to store next to every result."""
  info = {
      "cpu": cpu_model(),
      "cpu_count": os.cpu_count(),
      "cpu_flags": cpu_flags(),
      "platform": platform.platform(),
      "python": sys.version.split()[0],
      "load_average_at_start": load_average(),
      "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "JAX_PLATFORMS")
              if os.environ.get(k) is not None},
      "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers")},
  }
  try:
    import jax

    info["jax_devices"] = [str(d) for d in jax.devices()]
  except Exception:  # noqa: BLE001
    pass
  try:
    import torch

    info["torch_threads"] = torch.get_num_threads()
  except Exception:  # noqa: BLE001
    pass
  return info


def peak_rss_mib() -> float:
  """This process's peak resident set size so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, block: Callable[[Any], Any] | None = None,
            ) -> dict[str, Any]:
  """Calls `fn` `warmup` times untimed, then `repeats` times timed; returns seconds (median first).

  `block(result)` must wait until the result is computed (JAX dispatch is asynchronous); by default a result with
  `block_until_ready` (or a pytree of them) is blocked on, anything else is taken as already done.
  """
  block = block or block_until_ready
  for _ in range(warmup):
    block(fn())
  times, cpu = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), _process_cpu_s()
    block(fn())
    times.append(time.perf_counter() - start)
    cpu.append(_process_cpu_s() - cpu_start)
  return {
      "median_s": statistics.median(times),
      "cpu_median_s": statistics.median(cpu),  # CPU seconds of this process (all threads) per call
      "min_s": min(times),
      "max_s": max(times),
      "times_s": [round(t, 6) for t in times],
      "warmup": warmup,
      "repeats": repeats,
  }


def _process_cpu_s() -> float:
  t = os.times()
  return t.user + t.system


def block_until_ready(result: Any) -> Any:
  """Waits for JAX arrays anywhere in `result` (a no-op for torch tensors and plain values)."""
  try:
    import jax

    return jax.block_until_ready(result)
  except ImportError:
    return result


def matmul_peak(n: int = 2048, *, repeats: int = 10, torch_threads: int | None = None) -> dict[str, Any]:
  """Achievable fp32 matmul GFLOP/s on this CPU: a jitted jnp.dot and torch.mm of n x n float32, best of each.

  The peak is the larger of the two medians; forward passes are reported as a fraction of it. It measures what
  the installed BLAS/Eigen/oneDNN reach on a large square GEMM, not the datasheet figure. Each library also gets
  `gflops_per_cpu_s` (FLOPs per CPU-second of this process): unlike wall-clock GFLOP/s it barely moves when other
  processes share the cores, though spin-waiting threads (torch's OpenMP) inflate the CPU time.
  """
  import numpy as np

  flops = 2.0 * n ** 3
  rng = np.random.default_rng(0)
  a_np = rng.standard_normal((n, n), dtype=np.float32)
  b_np = rng.standard_normal((n, n), dtype=np.float32)
  out: dict[str, Any] = {"n": n, "flops": flops}
  try:
    import jax
    import jax.numpy as jnp

    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    t = time_fn(lambda: dot(a, b), warmup=2, repeats=repeats)
    out["jax"] = {"median_s": t["median_s"], "gflops": flops / t["median_s"] / 1e9,
                  "best_gflops": flops / t["min_s"] / 1e9, "gflops_per_cpu_s": flops / t["cpu_median_s"] / 1e9}
  except ImportError:
    pass
  try:
    import torch

    if torch_threads:
      torch.set_num_threads(torch_threads)
    ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
    with torch.inference_mode():
      t = time_fn(lambda: torch.mm(ta, tb), warmup=2, repeats=repeats)
    out["torch"] = {"median_s": t["median_s"], "gflops": flops / t["median_s"] / 1e9,
                    "best_gflops": flops / t["min_s"] / 1e9, "gflops_per_cpu_s": flops / t["cpu_median_s"] / 1e9}
  except ImportError:
    pass
  medians = [v["gflops"] for k, v in out.items() if k in ("jax", "torch")]
  out["peak_gflops"] = max(medians) if medians else float("nan")
  return out


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
  """A plain-text table with right-aligned numbers; floats printed with 3 significant decimals."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)

  cells = [[cell(v) for v in row] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
  line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
  sep = "  ".join("-" * w for w in widths)
  body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
  return "\n".join([line, sep, *body])


def write_json(path: str | os.PathLike, data: dict) -> Path:
  """Writes `data` as indented JSON, creating parent folders; returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
  return path


def wait_for_quiet(limit_s: float, threshold: float = 0.25, probe_s: float = 1.0) -> float:
  """Sleeps until other processes use under `threshold` cores over a `probe_s` window, or `limit_s` passed."""
  start = time.perf_counter()
  while time.perf_counter() - start < limit_s:
    a = CpuMonitor.snapshot()
    time.sleep(probe_s)
    other = CpuMonitor.other_cores(a, CpuMonitor.snapshot())
    if other is None or other < threshold:
      break
  return time.perf_counter() - start


def banner(info: dict, torch_threads: int) -> str:
  """One line naming the machine, versions, torch threads and load, printed at the top of every bench."""
  v = info["versions"]
  return (f"# {info['cpu']} x{info['cpu_count']} | jax {v['jax']} | torch {v['torch']} ({torch_threads} threads) | "
          f"transformers {v['transformers']} | load {info['load_average_at_start']}")


def ints(text: str) -> list[int]:
  """"4,8,16" -> [4, 8, 16] (a comma-separated command-line list)."""
  return [int(x) for x in text.split(",") if x.strip()]
