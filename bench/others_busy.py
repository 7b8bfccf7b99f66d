"""How many cores other processes kept busy while one process (and its children) ran: samples /proc/stat and the
process tree's CPU time every --every seconds until it exits, and writes {"others_busy": cores, ...} to --out.
bench/record_pipeline.py reads it (--others-busy-file) to mark a whole-pipeline timing contended (>= 0.25 cores).

    .venv/bin/python bench/others_busy.py PID --out FILE [--every 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
  """Busy CPU seconds of the whole machine since boot (all but idle and iowait)."""
  ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
  return (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICK


def tree_cpu_s(pid: int) -> float | None:
  """CPU seconds of `pid` and its live children (utime + stime; waited-for children's too); None once it has exited."""
  total, found = 0.0, False
  for entry in Path("/proc").iterdir():
    if not entry.name.isdigit():
      continue
    try:
      fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    me, parent = int(entry.name), int(fields[1])
    if me == pid and fields[0] in ("Z", "X"):  # exited; not yet reaped by its parent
      return None
    if me == pid or parent == pid:
      found = found or me == pid
      total += sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime
  return total if found else None


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("pid", type=int)
  p.add_argument("--out", required=True)
  p.add_argument("--every", type=float, default=2.0)
  args = p.parse_args(argv)
  first = last = (time.perf_counter(), machine_busy_s(), tree_cpu_s(args.pid))
  if first[2] is None:
    raise SystemExit(f"error: no process {args.pid}")
  while True:
    time.sleep(args.every)
    sample = (time.perf_counter(), machine_busy_s(), tree_cpu_s(args.pid))
    if sample[2] is None:
      break
    last = sample
  wall = last[0] - first[0]
  others = (last[1] - first[1] - (last[2] - first[2])) / wall if wall > 0 else None
  result = {"pid": args.pid, "watched_s": round(wall, 1), "process_cpu_s": round(last[2] - first[2], 1),
            "machine_busy_s": round(last[1] - first[1], 1), "others_busy": others}
  Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  return result


if __name__ == "__main__":
  main()
