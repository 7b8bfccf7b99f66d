"""Record a whole-pipeline run as bench/results/pipeline_<name>.json, from its workdir and a `time -v` log.

    /usr/bin/time -v .venv/bin/python -m dcr_jax.main --config=configs/llama.py --workdir=DIR > LOG 2>&1
    .venv/bin/python bench/record_pipeline.py --name smollm2 --workdir DIR --time-log LOG \
        --command "python -m dcr_jax.main --config=configs/llama.py --workdir=DIR" --load-at-start "0.34 1.10 2.56" \
        [--others-busy-file BUSY.json]   # from `bench/others_busy.py PID --out BUSY.json` run beside it

The JSON holds the command, wall/CPU/peak-RSS from the log, whether other processes were busy (--contended, the cores
they kept busy as bench/others_busy.py measured them (--others-busy-file, contended at >= 0.25), or
judged from --load-at-start: a 1-minute load average above 1.0 on this 2-core machine counts as contended), and
the run's report.json (stage seconds, evaluation). bench/results.py lists these files.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def from_time_log(text: str) -> dict:
  """Wall seconds, user/sys CPU seconds and peak RSS (MiB) from GNU time's -v output."""
  def field(name: str) -> str:
    match = re.search(re.escape(name) + r":\s*(.+)", text)
    if not match:
      raise SystemExit(f"--time-log has no '{name}' line; run the pipeline under /usr/bin/time -v")
    return match.group(1).strip()

  parts = [float(x) for x in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
  wall = sum(x * 60 ** i for i, x in enumerate(reversed(parts)))
  return {"wall_s": wall, "user_cpu_s": float(field("User time (seconds)")),
          "sys_cpu_s": float(field("System time (seconds)")),
          "peak_rss_mib": int(field("Maximum resident set size (kbytes)")) / 1024}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--time-log", required=True)
  p.add_argument("--command", required=True)
  p.add_argument("--load-at-start", default="", help="the 1/5/15-minute load averages when the run started")
  p.add_argument("--contended", action="store_true", help="other processes were busy during the run")
  p.add_argument("--others-busy-file", default="",
                 help="bench/others_busy.py's JSON for the run: contended when others kept >= 0.25 cores busy "
                      "(measured; preferred over the load average, which lags the previous minute)")
  args = p.parse_args(argv)
  timing = from_time_log(Path(args.time_log).read_text(errors="replace"))
  load = [float(x) for x in args.load_at_start.split()] if args.load_at_start else []
  others = json.loads(Path(args.others_busy_file).read_text()) if args.others_busy_file else None
  if others is not None:
    contended = args.contended or others["others_busy"] >= 0.25
  else:
    contended = args.contended or (bool(load) and load[0] > 1.0)
  minutes, seconds = divmod(round(timing["wall_s"]), 60)
  busy = (f"other processes kept {others['others_busy']:.2f} cores busy" if others is not None else
          f"load average at start {args.load_at_start or 'n/a'}")
  note = (f"{'contended' if contended else 'idle machine'} ({busy}); "
          f"wall {minutes}m{seconds:02d}s, user CPU {timing['user_cpu_s']:.0f} s, sys {timing['sys_cpu_s']:.0f} s, "
          f"peak RSS {timing['peak_rss_mib']:.0f} MiB")
  out = {"command": args.command, "contended": contended, "load_average_at_start": load, "others_busy": others,
         "note": note, **timing,
         "report": json.loads((Path(args.workdir) / "report.json").read_text())}
  path = Path(__file__).resolve().parent / "results" / f"pipeline_{args.name}.json"
  path.write_text(json.dumps(out, indent=1) + "\n")
  print(f"{note}\nwrote {path}")
  return out


if __name__ == "__main__":
  main()
