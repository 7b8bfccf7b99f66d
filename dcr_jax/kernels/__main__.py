"""python -m dcr_jax.kernels --config=FILE[:VARIANT] --workdir=DIR [--checkpoints=all|STEP,...] [--compare=DIR,...]

Writes DIR/kernels/similarity.json (one entry per checkpoint, the base model first), a heatmap PNG per checkpoint
and DIR/kernels/tracking.png (cross-group similarity and refusal probability against the step, overlaying the
--compare workdirs, e.g. STL vs DCR). Re-running skips checkpoints already measured. DIR may be gs://….
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from dcr_jax.errors import run_command
from dcr_jax.kernels.track import track
from dcr_jax.workdir_io import check_workdir

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config (as given to dcr_jax.main).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A dcr_jax.main workdir (local path or gs://…).")
_CHECKPOINTS = flags.DEFINE_string("checkpoints", "all", "all, or a comma-separated list of checkpoint steps.")
_COMPARE = flags.DEFINE_string("compare", "", "Other workdirs (comma-separated) whose similarity.json to overlay.")


def main(argv):
  if len(argv) > 1 or _CONFIG.value is None or not _WORKDIR.value:
    print("error: give --config=FILE[:VARIANT] and --workdir=DIR (and no other arguments)", file=sys.stderr)
    sys.exit(2)

  def body() -> str:
    workdir = check_workdir(_WORKDIR.value)
    result = track(_CONFIG.value, workdir, _CHECKPOINTS.value,
                   [check_workdir(p.strip()) for p in _COMPARE.value.split(",") if p.strip()])
    return f"done: {len(result['entries'])} checkpoints in {workdir / 'kernels' / 'similarity.json'}"

  run_command(body)


if __name__ == "__main__":
  app.run(main)
