"""The neural-tangents peer of bench/kernels_nt.py: `nt.empirical_ntk_fn` on the same tiny Gemma 3, in its own venv.

Runs under a separate interpreter (neural-tangents needs an older JAX than dcr_jax: jax 0.4.23, numpy < 2,
scipy < 1.13), so it imports only the standard library, jax, numpy, neural_tangents and bench/common.py (standard
library only at import time; it gives the same timing rule as every other bench). The model is re-implemented here
in plain jax.numpy from the exported parameters and config: token embedding scaled by sqrt(D), per block a pre-norm
attention (RMSNorm scaled by offset + w, per-head q/k RMSNorm, rotate-half RoPE with a local and a global base,
grouped-query attention over the prompt's valid tokens, causal, within the sliding window on local layers) and a
gated MLP (tanh-GELU or SiLU), each followed by its post-norm when configured, then the final norm and the tied (or
separate) head, with the optional soft-caps. The first generated token's logits are those at the last valid
prompt position, restricted to the token set S.

For every case it checks those logits against the ones dcr_jax computed (passed in), then, for each requested
implementation, times the jitted `empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=...)` over all
parameters on the N prompts (kernel [N N S S], fetched to the host) after warm-up calls, and saves the kernel.

    nt-venv/bin/python bench/nt_peer.py MANIFEST.json   (written by bench/kernels_nt.py; not meant to be run alone)
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CpuMonitor, time_fn  # noqa: E402  (standard library only)

def rms_norm(x, w, eps: float, offset: float):
  import jax
  import jax.numpy as jnp

  compute = jnp.promote_types(x.dtype, jnp.float32)
  xc = x.astype(compute)
  normed = xc * jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
  return (normed * (offset + w.astype(compute))).astype(x.dtype)


def inverse_frequencies(head_dim: int, theta: float, scale: float):
  import jax.numpy as jnp

  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)) / scale


def rope(x, positions, inv_freq):
  """x [T N H], positions [T]: rotate-half rotary embedding (angles in float32)."""
  import jax.numpy as jnp

  freqs = positions.astype(jnp.float32)[:, None] * inv_freq  # T H/2
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]  # T 1 H
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def make_forward(cfg: dict, one_hot: bool = False):
  """forward(params, tokens [T], mask [T]) -> first-token logits [V] (the last valid position). `one_hot`: the
  embedding lookup as one_hot(tokens) @ E instead of a gather (neural-tangents has no structured rule for gather, so
  STRUCTURED_DERIVATIVES would form its [T D V D] Jacobian per prompt)."""
  import jax
  import jax.numpy as jnp

  dtype = jnp.dtype(cfg["dtype"])
  d, n, k, h = cfg["embed_dim"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
  eps, offset = cfg["norm_eps"], cfg["norm_scale_offset"]
  scale = float(cfg["query_pre_attn_scalar"] or h) ** -0.5
  if cfg["rope_type"] != "linear" and cfg["rope_scale_global"] != 1.0:
    raise SystemExit(f"nt_peer: rope_type={cfg['rope_type']!r} with scaling {cfg['rope_scale_global']} is not "
                     "re-implemented here; give a config with linear RoPE (every --sizes entry of kernels_nt.py is)")
  local_freq = inverse_frequencies(h, cfg["rope_theta_local"], 1.0)
  global_freq = inverse_frequencies(h, cfg["rope_theta_global"], cfg["rope_scale_global"])
  norm = lambda x, w: rms_norm(x, w, eps, offset)
  act = ((lambda x: jax.nn.gelu(x, approximate=True)) if cfg["activation"] == "gelu_tanh" else jax.nn.silu)

  def dense(p, name, x):
    y = x @ p[name + ".kernel"].astype(x.dtype)
    bias = p.get(name + ".bias")
    return y if bias is None else y + bias.astype(x.dtype)

  def attention(p, pre, x, positions, mask, window, inv_freq):
    t = x.shape[0]
    q = dense(p, pre + "attn.q_proj", x).reshape(t, n, h)
    key = dense(p, pre + "attn.k_proj", x).reshape(t, k, h)
    value = dense(p, pre + "attn.v_proj", x).reshape(t, k, h)
    if cfg["use_qk_norm"]:
      q, key = norm(q, p[pre + "attn.q_norm.scale"]), norm(key, p[pre + "attn.k_norm.scale"])
    q, key = rope(q, positions, inv_freq), rope(key, positions, inv_freq)
    q = (q * scale).reshape(t, k, n // k, h)
    logits = jnp.einsum("tkgh,skh->kgts", q, key).astype(jnp.promote_types(dtype, jnp.float32))
    if cfg["attn_logit_softcap"] is not None:
      logits = jnp.tanh(logits / cfg["attn_logit_softcap"]) * cfg["attn_logit_softcap"]
    slots = jnp.arange(t)
    allowed = (mask[:, None] == mask[None, :]) & (mask[None, :] != 0) & (slots[None, :] <= slots[:, None])
    if window is not None:
      allowed = allowed & (slots[None, :] > slots[:, None] - window)
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("kgts,skh->tkgh", probs, value).reshape(t, n * h)
    return dense(p, pre + "attn.o_proj", out)

  def forward(p, tokens, mask):
    mask = mask.astype(jnp.int32)
    if one_hot:  # the same rows, exactly (one 1 and zeros per row), as a matmul
      x = jax.nn.one_hot(tokens, p["embedding"].shape[0], dtype=p["embedding"].dtype) @ p["embedding"]
    else:
      x = p["embedding"][tokens]
    x = x.astype(dtype)
    if cfg["scale_embeddings"]:
      x = x * jnp.asarray(d ** 0.5, dtype)
    positions = jnp.maximum(jnp.cumsum((mask != 0).astype(jnp.int32)) - 1, 0)
    for i, kind in enumerate(cfg["layer_types"]):
      pre = f"layers.{i}."
      window, inv_freq = (cfg["sliding_window"], local_freq) if kind == "local" else (None, global_freq)
      a = attention(p, pre, norm(x, p[pre + "pre_attn_norm.scale"]), positions, mask, window, inv_freq)
      if cfg["use_post_norms"]:
        a = norm(a, p[pre + "post_attn_norm.scale"])
      x = x + a
      hid = norm(x, p[pre + "pre_ffw_norm.scale"])
      m = dense(p, pre + "mlp.down_proj", act(dense(p, pre + "mlp.gate_proj", hid)) * dense(p, pre + "mlp.up_proj",
                                                                                             hid))
      if cfg["use_post_norms"]:
        m = norm(m, p[pre + "post_ffw_norm.scale"])
      x = x + m
    last = mask.shape[0] - 1 - jnp.argmax(mask[::-1] != 0)
    hidden = norm(x[last], p["final_norm.scale"])
    if cfg["tie_embeddings"]:  # E h as one dot_general over E's D axis: a transpose of E costs STRUCTURED_DERIVATIVES
      logits = p["embedding"].astype(dtype) @ hidden  # a dense [V D V D] Jacobian (68 GB for xs at N=4)
    else:
      logits = hidden @ p["head"].astype(dtype)
    logits = logits.astype(jnp.promote_types(dtype, jnp.float32))
    if cfg["final_logit_softcap"] is not None:
      logits = jnp.tanh(logits / cfg["final_logit_softcap"]) * cfg["final_logit_softcap"]
    return logits

  return forward


def largest_buffer(hlo: str) -> int:
  """Bytes of the largest array in a compiled module's HLO text (a lower bound on its peak memory)."""
  import re

  import numpy as np

  sizes = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "s32": 4, "s64": 8, "pred": 1, "u32": 4, "u8": 1, "s8": 1}
  best = 0
  for kind, dims in re.findall(r"\b(f16|bf16|f32|f64|s32|s64|pred|u32|u8|s8)\[([0-9,]*)\]", hlo):
    best = max(best, int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * sizes[kind])
  return best


def main(manifest_path: str) -> None:
  manifest = json.loads(Path(manifest_path).read_text())
  cfg = manifest["config"]
  import jax

  if cfg["dtype"] == "float64":
    jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_default_matmul_precision", "highest")  # no effect on CPU; equal exactness elsewhere
  import jax.numpy as jnp
  import numpy as np

  t0 = time.perf_counter()
  import neural_tangents as nt  # its package import pulls in tensorflow (experimental/empirical_tf): seconds

  import_s = time.perf_counter() - t0
  out_dir = Path(manifest["out_dir"])
  with np.load(manifest["params"]) as z:
    params = {name: jnp.asarray(z[name]) for name in z.files}
  forward = make_forward(cfg)
  result = {"versions": {"jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__,
                         "numpy": np.__version__, "neural_tangents": getattr(nt, "__version__", None)},
            "python": sys.version.split()[0], "executable": sys.executable, "devices": [str(x) for x in jax.devices()],
            "neural_tangents_import_s": import_s, "cases": {}}
  try:
    from importlib.metadata import version

    result["versions"]["neural_tangents"] = version("neural-tangents")
  except Exception:  # noqa: BLE001
    pass

  for case in manifest["cases"]:
    with np.load(case["inputs"]) as z:
      tokens, mask, ids, ours = (z[k] for k in ("tokens", "mask", "ids", "logits"))
    ids_j = jnp.asarray(ids)

    def f(p, x):  # batched: x = {"tokens": [B T], "mask": [B T]} -> [B S]
      return jax.vmap(lambda t, m: forward(p, t, m)[ids_j])(x["tokens"], x["mask"])

    x = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
    logits = np.asarray(jax.jit(f)(params, x))
    rec = {"logits_max_abs_diff": float(np.max(np.abs(logits - ours))),
           "logits_max_abs": float(np.max(np.abs(ours))), "implementations": {}}
    result["cases"][case["name"]] = rec
    if not rec["logits_max_abs_diff"] <= manifest["logits_atol"] * max(1.0, rec["logits_max_abs"]):
      rec["error"] = f"logits differ from dcr_jax's by {rec['logits_max_abs_diff']:.3e}: not timed"
      print(f"[nt_peer] {case['name']}: {rec['error']}", flush=True)
      continue
    for impl in manifest["implementations"]:
      r: dict = {}
      rec["implementations"][impl] = r
      try:
        ntk_fn = nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0,
                                     implementation=getattr(nt.NtkImplementation, impl))
        start = time.perf_counter()
        kernel = jax.jit(lambda x1, p: ntk_fn(x1, None, p)).lower(x, params).compile()
        r["compile_s"] = time.perf_counter() - start
        r["largest_buffer_bytes"] = largest_buffer(kernel.as_text())
        if r["largest_buffer_bytes"] > manifest["limit_gb"] * 1e9:  # XLA would allocate it (or the OOM killer strike)
          r["error"] = (f"does not fit: one {r['largest_buffer_bytes'] / 1e9:.1f} GB buffer > limit "
                        f"{manifest['limit_gb']} GB")
          print(f"[nt_peer] {case['name']} {impl}: {r['error']}", flush=True)
          continue
        start = time.perf_counter()
        first = np.asarray(kernel(x, params))
        r["first_call_s"] = time.perf_counter() - start
        repeats = manifest["repeats"]
        if manifest["warmup"]:
          start = time.perf_counter()
          for _ in range(manifest["warmup"]):
            np.asarray(kernel(x, params))
          warm = (time.perf_counter() - start) / manifest["warmup"]
          repeats = max(1, min(repeats, int(manifest["case_budget_s"] / max(warm, 1e-9))))
        a = CpuMonitor.snapshot()
        t = time_fn(lambda: np.asarray(kernel(x, params)), warmup=0, repeats=repeats)
        b = CpuMonitor.snapshot()
        r.update(wall_s=t["median_s"], cpu_s=t["cpu_median_s"], min_s=t["min_s"], times_s=t["times_s"],
                 repeats=repeats, others_busy=CpuMonitor.other_cores(a, b), shape=list(first.shape),
                 dtype=str(first.dtype))
        path = out_dir / f"{case['name']}__{impl}.npy"
        np.save(path, first)
        r["kernel"] = str(path)
        print(f"[nt_peer] {case['name']} {impl}: {t['median_s']:.4f}s (first call {r['first_call_s']:.1f}s)",
              flush=True)
      except Exception as e:  # noqa: BLE001 - one implementation failing is recorded, the others still run
        r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        r["traceback"] = traceback.format_exc()[-2000:]
        print(f"[nt_peer] {case['name']} {impl}: FAILED {r['error']}", flush=True)
  (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  main(sys.argv[1])
