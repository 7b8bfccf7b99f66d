"""Workdir file I/O through `etils.epath`, so a workdir may be a local directory or a `gs://` (or any other scheme
epath supports, e.g. `s3://`) URI.

Local paths keep the POSIX guarantees the pipeline relies on (temp file + `os.replace` for atomic rewrites, append
+ fsync for JSONL logs). Object stores have neither rename-into-place nor append, but a single object write is
atomic, so remote rewrites are one `write_text` and remote appends read the object and write it back whole (O(size)
per append: fine for the pipeline's JSON/JSONL files, which stay small). Object stores have no directories, so
`ensure_dir` does nothing for them (writing an object creates its prefix).
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile

import jax
from etils import epath

from dcr_jax.errors import UserError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def as_path(path: epath.PathLike) -> epath.Path:
  """`path` as an epath.Path; `gs://b/r` keeps its `//` (pathlib.Path would make it `gs:/b/r`)."""
  return path if isinstance(path, epath.Path) else epath.Path(path)


def is_remote(path: epath.PathLike) -> bool:
  """True for a URI workdir (`gs://…`, `s3://…`, `az://…`), False for a local path."""
  return bool(_URI.match(os.fspath(path)))


def check_workdir(path: str) -> epath.Path:
  """The --workdir value as an epath.Path; a URI scheme epath does not serve is a UserError naming it."""
  try:
    return epath.Path(path)
  except KeyError:  # epath's registry of URI prefixes
    raise UserError(f"--workdir={path}: unsupported URI scheme; use a local path or gs:// (or s3://, az://)") from None


def ensure_dir(path: epath.PathLike) -> None:
  """mkdir -p for a local directory; nothing for an object-store prefix."""
  if not is_remote(path):
    as_path(path).mkdir(parents=True, exist_ok=True)


def default_file_mode() -> int:
  """The mode open() would give a new file under the current umask (0o666 minus the umask)."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def write_text_atomic(path: epath.PathLike, text: str) -> None:
  """Replaces `path` with `text` so a reader never sees a half-written file: temp file + rename locally, one object
  write (atomic per object) remotely."""
  path = as_path(path)
  if is_remote(path):
    path.write_text(text, encoding="utf-8")
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix=f".{path.name}.")
  try:
    os.fchmod(fd, default_file_mode())  # mkstemp makes 0600; the result should read like any file written here
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, os.fspath(path))
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def append_text(path: epath.PathLike, text: str, fsync: bool = False) -> None:
  """Appends `text` to `path`: a local append (fsync'd if asked); remotely the object is read and rewritten whole
  (object stores cannot append), which costs O(object size) per call."""
  path = as_path(path)
  if is_remote(path):
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(old + text, encoding="utf-8")
    return
  with open(os.fspath(path), "a", encoding="utf-8") as f:
    f.write(text)
    if fsync:
      f.flush()
      os.fsync(f.fileno())


def is_main_process() -> bool:
  """True on process 0, the one that writes the workdir's shared files."""
  return jax.process_index() == 0


def write_json(path: epath.PathLike, data) -> None:
  """Atomic JSON write by process 0 only: a crash never leaves a half-written file (temp file + rename for a local
  path, one object write for gs://…)."""
  if not is_main_process():
    return
  write_text_atomic(path, json.dumps(data, indent=2, default=str))


def update_report(workdir: epath.PathLike, section: str, key: str | None, value) -> dict:
  """Merges one entry into DIR/report.json and rewrites it atomically."""
  path = as_path(workdir) / "report.json"
  report = json.loads(path.read_text()) if path.is_file() else {}
  if key is None:
    report[section] = value
  else:
    report.setdefault(section, {})[key] = value
  write_json(path, report)
  return report


def read_rows(path: epath.PathLike) -> list[dict]:
  """The JSON rows of a JSONL file (eval/*.jsonl) already written; a torn last line (crash mid-write) is dropped and the file truncated to the good part.
  (A remote object is written whole, so it cannot be torn; a bad tail there is cut by rewriting the object.)"""
  path = as_path(path)
  if not path.is_file():
    return []
  data = path.read_bytes()
  rows, good_bytes = [], 0
  for line in io.BytesIO(data):  # split on b'\n' only, as iterating the file did
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      break
    good_bytes += len(line)
  if good_bytes != len(data):
    if is_remote(path):
      path.write_bytes(data[:good_bytes])
    else:
      with open(path, "r+b") as f:
        f.truncate(good_bytes)
  return rows


def append_rows(path: epath.PathLike, rows: list[dict]) -> None:
  """Appends rows to a JSONL file (fsync'd locally), by process 0 only (every process computes them). On gs://… the object is read and rewritten whole per batch
  (object stores cannot append): O(rows so far) per batch, small next to a batch of generation."""
  if jax.process_index() != 0:  # every process generates (the model is sharded); process 0 writes
    return
  append_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), fsync=True)
