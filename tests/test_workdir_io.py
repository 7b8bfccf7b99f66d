"""Workdir I/O through etils.epath: local paths keep their atomic/append semantics, and a gs:// workdir is written
without rename or append.

No network: `gs://` is served by an fsspec in-memory filesystem registered under the `gs`/`gcs` protocols, which is
what epath's fsspec backend asks fsspec for (gcsfs in production). The fake refuses append mode and renames, and
`os.replace`/`tempfile.mkstemp` are made to fail, so the remote branches are the ones that ran.
"""

import importlib
import importlib.util
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from dcr_jax import checkpoints, pipeline, report, workdir_io
from dcr_jax.train import loop

ROOT = Path(__file__).resolve().parents[1]
RUN = "gs://bucket/run"


class FakeGCS(MemoryFileSystem):
  """gs:// in memory; like an object store, no append and no rename."""

  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes gcsfs's finalize_on_close
    super().__init__(*args, **kwargs)

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise AssertionError(f"append on an object store: {path}")
    return super()._open(path, mode, **kwargs)

  def mv(self, *args, **kwargs):
    raise AssertionError("rename on an object store")

  rename = mv


def _forbidden(*args, **kwargs):
  raise AssertionError("local-only I/O used for a gs:// path")


@pytest.fixture
def gcs(monkeypatch):
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  FakeGCS.clear_instance_cache()
  for name in ("gs", "gcs"):
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, name, FakeGCS)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setattr(os, "replace", _forbidden)
  monkeypatch.setattr(tempfile, "mkstemp", _forbidden)
  yield FakeGCS.store
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


def text(store, path) -> str:
  return store[path].getvalue().decode("utf-8")


def test_gs_uri_survives_epath():
  path = epath.Path(RUN)
  assert str(path) == RUN and path.as_uri() == RUN and str(path / "report.json") == f"{RUN}/report.json"
  assert workdir_io.is_remote(path) and workdir_io.is_remote("s3://b/r")
  assert not workdir_io.is_remote("/tmp/run") and not workdir_io.is_remote(Path("runs/x"))
  assert str(Path(RUN)) == "gs:/bucket/run"  # what pathlib did to it


def test_main_parses_gs_workdir(monkeypatch, capsys):
  from absl import flags

  from dcr_jax import main

  seen = []
  monkeypatch.setattr(main, "run", lambda config, workdir: seen.append(workdir) or {"stages": {"demo": {}}})
  flags.FLAGS(["dcr_jax.main", f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={RUN}/x"])
  try:
    main.main(["dcr_jax.main"])
  finally:
    flags.FLAGS.unparse_flags()
  assert isinstance(seen[0], epath.Path) and str(seen[0]) == f"{RUN}/x"
  assert f"done: {RUN}/x/report.json" in capsys.readouterr().out


def test_main_rejects_an_unsupported_scheme(monkeypatch, capsys):
  from absl import flags

  from dcr_jax import main

  monkeypatch.setattr(main, "run", lambda config, workdir: pytest.fail("run reached"))
  flags.FLAGS(["dcr_jax.main", f"--config={ROOT / 'configs' / 'tiny.py'}", "--workdir=memory://x"])
  try:
    with pytest.raises(SystemExit) as e:
      main.main(["dcr_jax.main"])
  finally:
    flags.FLAGS.unparse_flags()
  assert e.value.code == 2 and "memory://x" in capsys.readouterr().err


def test_write_json_and_update_report_on_gs(gcs):
  workdir_io.write_json(epath.Path(RUN) / "demo.json", [{"a": 1}])
  assert json.loads(text(gcs, f"{RUN}/demo.json")) == [{"a": 1}]
  workdir_io.update_report(RUN, "model", None, {"name": "tiny"})
  merged = workdir_io.update_report(epath.Path(RUN), "stages", "refine", {"steps": 3})
  assert json.loads(text(gcs, f"{RUN}/report.json")) == merged == {"model": {"name": "tiny"},
                                                                    "stages": {"refine": {"steps": 3}}}
  assert report.load_report(RUN) == merged and report.run_name(RUN, merged) == "run"
  assert str(report.write_report_md(RUN)) == f"{RUN}/report.md"
  assert text(gcs, f"{RUN}/report.md").startswith("# DCR run `run`")


def test_prepare_workdir_on_gs_rejects_a_changed_config(gcs):
  from dcr_jax.config import base_config
  from dcr_jax.errors import UserError

  config = base_config()
  pipeline.prepare_workdir(epath.Path(RUN), config)
  assert json.loads(text(gcs, f"{RUN}/config.json"))["seed"] == config.seed
  config.seed += 1
  with pytest.raises(UserError, match="config.seed"):
    pipeline.prepare_workdir(epath.Path(RUN), config)


def test_metrics_writer_on_gs_rewrites_the_object_and_copies_tensorboard(gcs):
  (epath.Path(RUN) / "metrics.jsonl").write_text('{"stage": "refine", "step": 1, "loss": 3.0}\n')  # resumed run
  writer = loop.MetricsWriter(epath.Path(RUN))
  writer.write("refine", 2, {"loss": 2.0})
  writer.write("align", 1, {"loss": 1.5})
  rows = [json.loads(line) for line in text(gcs, f"{RUN}/metrics.jsonl").splitlines()]
  assert [(r["stage"], r["step"], r["loss"]) for r in rows] == [("refine", 1, 3.0), ("refine", 2, 2.0),
                                                                 ("align", 1, 1.5)]
  assert loop.last_logged(epath.Path(RUN) / "metrics.jsonl", "refine", "loss") == 2.0
  events = [k for k in gcs if k.startswith(f"{RUN}/tensorboard/events.out.tfevents.")]
  local = list(Path(writer._tb_local.name).iterdir())
  assert len(events) == 1 == len(local) and gcs[events[0]].getvalue() == local[0].read_bytes()
  assert scalars(gcs[events[0]].getvalue()) == [("refine/loss", 2, 2.0), ("align/loss", 1, 1.5)]


def scalars(data: bytes) -> list[tuple]:
  """(tag, step, value) of every scalar in a TFRecord event file (u64 length, u32 crc, payload, u32 crc)."""
  from tensorboardX.proto.event_pb2 import Event

  found, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    event = Event.FromString(data[offset + 12:offset + 12 + length])
    found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    offset += 12 + length + 4
  return found


def test_eval_jsonl_on_gs_appends_by_rewrite_and_drops_a_torn_tail(gcs, monkeypatch):
  path = epath.Path(RUN) / "eval" / "demo.jsonl"
  workdir_io.append_rows(path, [{"prompt": "a"}])
  workdir_io.append_rows(path, [{"prompt": "b"}, {"prompt": "c"}])
  assert [r["prompt"] for r in workdir_io.read_rows(path)] == ["a", "b", "c"]
  path.write_text(text(gcs, str(path)) + '{"prompt": "to')
  assert [r["prompt"] for r in workdir_io.read_rows(path)] == ["a", "b", "c"]
  assert text(gcs, str(path)).splitlines() == ['{"prompt": "a"}', '{"prompt": "b"}', '{"prompt": "c"}']


def test_checkpoints_on_gs_are_not_resolved(gcs, monkeypatch):
  seen = []
  monkeypatch.setattr(checkpoints.ocp, "CheckpointManager", lambda directory, options: seen.append(directory))
  checkpoints.manager(checkpoints.stage_dir(RUN, "refine"), keep=2)
  assert str(seen[0]) == f"{RUN}/checkpoints/refine"
  (epath.Path(RUN) / "checkpoints" / "align" / "4" / "x").write_text("")
  assert checkpoints.kept_steps(RUN, "align") == [4] and checkpoints.kept_steps(RUN, "refine") == []


def test_demo_run_on_gs_workdir(gcs):
  from dcr_jax import main

  config = _tiny_config()
  config.stages = "demo"
  config.demo.max_new_tokens = 2
  result = main.run(config, epath.Path(RUN))
  assert result["stages"]["demo"]["prompts"] == 3
  assert len(json.loads(text(gcs, f"{RUN}/demo.json"))) == 3
  assert json.loads(text(gcs, f"{RUN}/report.json")) == result and f"{RUN}/report.md" in gcs


def test_local_workdir_keeps_atomic_replace_and_append(tmp_path):
  workdir_io.write_json(tmp_path / "sub" / "x.json", {"a": 1})
  workdir_io.write_json(str(tmp_path / "sub" / "x.json"), {"a": 2})
  assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": 2}
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.json"]  # no temp file left behind
  writer = loop.MetricsWriter(tmp_path)  # a pathlib.Path workdir is accepted too
  writer.write("refine", 1, {"loss": 1.0})
  writer.write("refine", 2, {"loss": 0.5})
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
  assert any((tmp_path / "tensorboard").iterdir()) and writer._tb_local is None
  assert loop.last_logged(tmp_path / "metrics.jsonl", "refine", "loss") == 0.5


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
  old = os.umask(0o022)
  try:
    workdir_io.write_json(tmp_path / "report.json", {"a": 1})
    from dcr_jax.data.loaders import write_jsonl
    write_jsonl([{"a": 1}], tmp_path / "rows.jsonl")
  finally:
    os.umask(old)
  assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
  assert (tmp_path / "rows.jsonl").stat().st_mode & 0o777 == 0o644


def test_kernels_on_a_gs_workdir_keep_the_uri_and_write_every_output(gcs):
  """`python -m dcr_jax.kernels --workdir=gs://…`: read and written through epath (pathlib made it `gs:/…`)."""
  from dcr_jax.kernels.track import track

  config = _tiny_config()
  config.kernels.n_per_group, config.kernels.top_k, config.kernels.chunk_size = 2, 2, 2
  (epath.Path(RUN) / "config.json").write_text(config.to_json_best_effort())
  result = track(config, RUN, "all", [])
  assert [e["label"] for e in result["entries"]] == ["base"]  # no checkpoint in this run yet
  assert json.loads(text(gcs, f"{RUN}/kernels/similarity.json")) == result
  for name in ("heatmap-base.png", "tracking.png"):
    assert gcs[f"{RUN}/kernels/{name}"].getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads(text(gcs, f"{RUN}/report.json"))["kernels"]["entries"] == 1


def _tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
