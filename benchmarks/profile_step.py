"""Where the jitted train step's time goes on this machine: XLA's executed kernels, attributed to source ops.

  python benchmarks/profile_step.py [--config=configs/shapes.py] [--steps=2] [--top=25] [--config.model.depth=8 ...]

Compiles `Setup.train_step`, runs it under the JAX profiler and sums each executed kernel's time (the Perfetto
trace's events) per source op: the op_name metadata XLA keeps on every fusion, with block indices folded so that the
8 blocks' copies of one op add up. Prints one JSON line: kernel milliseconds per step by kind (matmul kernels, other
fusions, copies/transposes), the time no kernel ran on any thread (`idle_ms_per_step`), the asynchronous kernels
(XLA:CPU's Eigen dots, whose compute has no event of its own: `async_kernels`, see kernel_times) and the `--top`
source ops.
XLA:CPU runs some kernels concurrently, so the kernel sum can exceed the step's wall time; compare shares, and
compare two trees or settings side by side in one session.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags
import jax

from rflow_jax import cli
from rflow_jax.train import trainer

config_flags.DEFINE_config_file("config", "configs/shapes.py", "Config file.", lock_config=True)
flags.DEFINE_integer("steps", 2, "Profiled steps (after two warm-up steps).")
flags.DEFINE_integer("top", 25, "Source ops to list.")
flags.DEFINE_string(
    "dump_dir", None, "If set, writes the compiled HLO (hlo.txt), every kernel's ms (kernels.json, async_kernels.json)."
)
FLAGS = flags.FLAGS

# An end event this long (microseconds) after its launch event ended marks an asynchronous kernel.
_ASYNC_US = 100
_META = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"")


def op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: op_name} of the compiled module; kernels in the trace are named after their instruction."""
  return {m.group(1): m.group(2) for m in map(_META.match, hlo_text.splitlines()) if m}


def source_op(op_name: str) -> str:
  """Folds the block index and the jit prefix, so the blocks' copies of one op share a key."""
  op_name = re.sub(r"^jit\([^)]*\)/", "", op_name)
  return re.sub(r"blocks_\d+", "blocks_N", op_name)


def kind(kernel: str, op_name: str = "") -> str:
  """Matmul kernels (XNNPACK/YNNPACK/oneDNN/Eigen dots; cuBLAS GEMMs), copies and transposes, or any other fusion.

  A library fusion (ynn_fusion...) is a matmul only where its op is one: given the op_name, XLA:CPU's YNNPACK
  reductions (the norms' and the biases' gradient sums) count as other fusions.
  """
  if kernel.startswith(("ynn", "xnn", "onednn")):
    library_dot = not op_name or any(s in op_name for s in ("dot_general", "conv"))
    return "matmul" if library_dot else "other_fusion"
  if any(s in kernel for s in ("dot", "convolution", "gemm", "cublas")):
    return "matmul"
  if kernel.startswith(("copy", "transpose")):
    return "copy_transpose"
  return "other_fusion"


def kernel_times(trace: str, steps: int) -> tuple[collections.Counter, float, dict[str, tuple[float, float]]]:
  """Milliseconds per step of each executed kernel, from the profiler's Perfetto trace (a directory holding
  perfetto_trace.json.gz, or the file); the milliseconds per step in which no kernel ran on any thread (between
  the first kernel and the last: dispatch, thread hand-offs); and the asynchronous kernels' spans.

  XLA:CPU runs some kernels asynchronously (its Eigen dots: on the vs_diffusers model, the weight gradients of
  every dense layer, a third of the step's matmul FLOPs): their event marks only the launch (its duration is what
  the first value counts), and a later "end: <kernel>" event the completion; their compute runs on the pool's
  threads with no event of its own. So each such kernel's launch-to-end span per step is returned apart, as
  (span ms, ms of it in which no other kernel ran): the first may include waiting behind other kernels, the second
  is certainly its own (an upper and a lower bound of its time). Both count as busy for the idle time.
  A GPU trace (benchmarks/gpu.py --dump_dir) has processes named /device:GPU:N: then only their events count, each
  under its XLA instruction (args.hlo_op) where it names one, else its kernel's name. (Written from the process and
  argument names such traces are reported to have; not yet run on a real GPU trace here.)
  """
  if trace.endswith(".gz"):
    path = trace
  else:
    (path,) = glob.glob(f"{trace}/**/perfetto_trace.json.gz", recursive=True)  # Exactly one trace in the directory.
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  gpus = {
      e.get("pid")
      for e in events
      if e.get("ph") == "M" and e.get("name") == "process_name" and "/device:GPU" in e.get("args", {}).get("name", "")
  }
  # out: each kernel's recorded time; spans: [start, stop, kernel, launch stop] per kernel event, stop moved to the
  # kernel's end event; started: a kernel's name -> its latest event's index in spans; asyncs: the asynchronous ones.
  out, spans, started, asyncs = collections.Counter(), [], {}, set()
  for e in sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"]):
    if gpus:  # Every event of a GPU's process is a kernel (CUDA names may hold "::"); the host's are not.
      if e.get("pid") not in gpus:
        continue
      name = e.get("args", {}).get("hlo_op") or e.get("name", "")
    else:
      name = e.get("name", "")
      # Python frames ("$file:line") and the runtime's own spans are not kernels.
      if name.startswith("$") or "::" in name or name.startswith(("PjitFunction", "Execute")):
        continue
    if name.startswith("end: "):  # An asynchronous kernel (e.g. an Eigen dot) ends here: its span is start..end.
      i = started.get(name[len("end: ") :])
      if i is not None:
        end = e["ts"] + e.get("dur", 0)
        spans[i][1] = max(spans[i][1], end)
        if end - spans[i][3] > _ASYNC_US:  # Every kernel has an end event; a synchronous one's follows its launch.
          asyncs.add(i)
      continue
    started[name] = len(spans)
    out[name] += e.get("dur", 0) / 1e3 / steps
    spans.append([e["ts"], e["ts"] + e.get("dur", 0), name, e["ts"] + e.get("dur", 0)])
  idle, end = 0.0, None
  for start, stop, *_ in sorted(spans):  # Gaps in the union of the kernels' intervals (microseconds).
    if end is not None and start > end:
      idle += start - end
    end = stop if end is None else max(end, stop)
  others = sorted(s[:2] for i, s in enumerate(spans) if i not in asyncs)
  async_ms = collections.defaultdict(lambda: [0.0, 0.0])
  for i in sorted(asyncs):
    start, stop, name, _ = spans[i]
    alone, at = 0.0, start  # at: how far into the span the other kernels' union has been walked.
    for o_start, o_stop in others:
      if o_start >= stop:
        break
      if o_stop <= at:
        continue
      alone += max(0.0, o_start - at)
      at = max(at, o_stop)
    alone += max(0.0, stop - at)
    async_ms[name][0] += (stop - start) / 1e3 / steps
    async_ms[name][1] += alone / 1e3 / steps
  return out, idle / 1e3 / steps, {k: tuple(v) for k, v in async_ms.items()}


def main(argv):
  del argv
  setup = trainer.Setup(FLAGS.config)
  state = setup.init_state()
  batch = setup.global_batch(next(setup.data_iterator()))
  with setup.step_context():
    compiled = setup.train_step.lower(state, batch).compile()
  names = op_names(compiled.as_text())
  for _ in range(2):  # Warm-up.
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(FLAGS.steps):
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / FLAGS.steps
    kernels, idle_ms, async_ms = kernel_times(d, FLAGS.steps)
  if FLAGS.dump_dir:  # To read one fusion's body: grep its kernel name in hlo.txt.
    os.makedirs(FLAGS.dump_dir, exist_ok=True)
    with open(f"{FLAGS.dump_dir}/hlo.txt", "w") as f:
      f.write(compiled.as_text())
    rows = [[k, round(ms, 2), names.get(k, "")] for k, ms in kernels.most_common()]
    with open(f"{FLAGS.dump_dir}/kernels.json", "w") as f:
      json.dump(rows, f, indent=0)
    rows = [[k, round(v[0], 2), round(v[1], 2), names.get(k, "")] for k, v in sorted(async_ms.items())]
    with open(f"{FLAGS.dump_dir}/async_kernels.json", "w") as f:  # [kernel, span ms, alone ms, op_name] per step.
      json.dump(rows, f, indent=0)
  by_kind, by_op = collections.Counter(), collections.Counter()
  for kernel, ms in kernels.items():
    by_kind[kind(kernel, names.get(kernel, ""))] += ms
    by_op[source_op(names.get(kernel, "(no metadata)"))] += ms
  print(
      json.dumps(
          {
              "model": {k: FLAGS.config.model[k] for k in ("hidden_size", "depth", "num_heads", "attention_impl")},
              "global_batch": FLAGS.config.train.global_batch_size,
              "step_wall_ms_under_profiler": round(wall * 1e3, 1),
              "kernel_ms_per_step": round(sum(kernels.values()), 1),
              # No kernel running or in flight; includes the gaps between the profiled steps.
              "idle_ms_per_step": round(idle_ms, 1),
              "by_kind_ms": {k: round(v, 1) for k, v in by_kind.most_common()},
              # Asynchronous kernels (XLA:CPU's Eigen dots), not in the sums above: launch-to-end span per step,
              # and the part of it in which no other kernel ran (see kernel_times).
              "async_kernels": {
                  "kernels": len(async_ms),
                  "span_ms_per_step": round(sum(v[0] for v in async_ms.values()), 1),
                  "alone_ms_per_step": round(sum(v[1] for v in async_ms.values()), 1),
              },
              "top_ops_ms": [[op, round(ms, 1)] for op, ms in by_op.most_common(FLAGS.top)],
              "backend": jax.default_backend(),
          }
      )
  )


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
