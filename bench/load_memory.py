"""Peak host memory while loading gemma-3-270m with and without `scan_layers`: the stacked layout is filled in place,
so the per-layer and stacked copies never coexist. Each measurement runs in its own process (ru_maxrss is a
process's high-water mark). The load is measured from the resident memory just before loading (`baseline_rss_mib`),
not from the earlier high-water mark, which tokenizer building leaves ~300 MiB higher. Writes
bench/results/load_memory.json with the load average; memory figures are not affected by other processes.

    python bench/load_memory.py
"""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dcr_jax

RESULT = Path(__file__).resolve().parent / "results" / "load_memory.json"


def measure(scan: bool) -> dict:
  """Baseline RSS (the GGUF's header and tokenizer read, no parameter loaded: resident now and the high-water mark so
  far), peak RSS after loading the params (pipeline.build_model's path: load_params), the parameter bytes and the
  GGUF's size."""
  import jax

  from dcr_jax.weights import EMBEDDED_VARIANT, load_params, load_tokenizer, resolve_source

  cfg, source = resolve_source(EMBEDDED_VARIANT)  # assembles the GGUF once and reads its header
  load_tokenizer(source)
  baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  model = load_params(cfg.replace(scan_layers=scan), source, progress=False)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  params = sum(x.nbytes for x in jax.tree.leaves(model))
  return {"scan_layers": scan, "baseline_rss_mib": round(resident, 1), "baseline_max_mib": round(baseline / 1024, 1),
          "peak_mib": round(peak / 1024, 1), "params_mib": round(params / 2**20, 1),
          "load_mib": round(peak / 1024 - resident, 1),
          "gguf_file_mib": round(source.path.stat().st_size / 2**20, 1)}


def main() -> None:
  if len(sys.argv) == 2:
    print(json.dumps(measure(sys.argv[1] == "scan")))
    return
  rows = [json.loads(subprocess.run([sys.executable, __file__, mode], check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1]) for mode in ("layers", "scan")]
  layers, scan = rows
  result = {"rows": rows, "scan_over_layers_peak": round(scan["peak_mib"] / layers["peak_mib"], 3),
            "scan_load_over_params": round(scan["load_mib"] / scan["params_mib"], 3),
            "targets": {"peaks_within": 1.10, "scan_load_over_params_at_most": 1.2},
            "load_average": [round(x, 2) for x in os.getloadavg()]}
  RESULT.write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
