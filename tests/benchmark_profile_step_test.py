"""benchmarks/profile_step.py's kernel_times on synthetic Perfetto traces: XLA:CPU's (host threads, asynchronous
dots) and a GPU's (/device:GPU:N processes, kernels keyed by their XLA instruction)."""

import gzip
import json
import subprocess
import sys

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)

# In a subprocess: profile_step defines absl flags at import, which other modules of a test worker may define too.
CODE = """
import json, sys
sys.path.insert(0, "benchmarks")
import profile_step
kernels, idle, asyncs = profile_step.kernel_times(sys.argv[1], steps=2)
kinds = [profile_step.kind(k, op) for k, op in [("ynn_fusion.3", "jit(f)/blocks_1/mlp/fc1/dot_general"),
         ("ynn_fusion.4", "jit(f)/blocks_1/ln/reduce_sum"), ("ynn_fusion.5", ""), ("dot.7", ""), ("copy.2", "")]]
print(json.dumps({"kernels": dict(kernels), "idle_ms": idle, "async": asyncs, "kinds": kinds}))
"""


def _kernel_times(tmp_path, events):
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  proc = subprocess.run(
      [sys.executable, "-c", CODE, str(path)], cwd=cli_util.ROOT, env=cli_util.ENV, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout)


def _x(name, ts, dur, pid=1, **args):
  return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": 1, "args": args}


def test_cpu_trace_counts_kernels_not_runtime_spans_and_async_dots_as_busy(tmp_path):
  events = [
      _x("PjitFunction(train_step)", 0, 1000),  # The runtime's own span, and a Python frame: not kernels.
      _x("$train.py:12 step", 0, 1000),
      _x("dot.3", 100, 10),  # An asynchronous dot: its launch (10 us) counts as its kernel time ...
      _x("mul_fusion", 150, 50),  # (another kernel runs during 50 of the dot's 200 us; a synchronous one: its end
      _x("end: mul_fusion", 200, 0),  # event follows its launch's)
      _x("end: dot.3", 300, 0),  # ... and it keeps the thread busy until here.
      _x("add_fusion", 400, 50),  # 100 us after the dot ended: idle.
      _x("add_fusion", 460, 40),
  ]
  r = _kernel_times(tmp_path, events)
  # Milliseconds per step over 2 steps.
  assert r["kernels"] == {"dot.3": 0.005, "mul_fusion": 0.025, "add_fusion": 0.045}
  assert abs(r["idle_ms"] - (100 + 10) / 1e3 / 2) < 1e-9
  # The dot's launch-to-end span (200 us), and the 150 us of it in which no other kernel ran.
  assert r["async"] == {"dot.3": [0.1, 0.075]}


def test_library_fusions_are_matmuls_only_where_their_op_is_a_dot(tmp_path):
  r = _kernel_times(tmp_path, [_x("add_fusion", 0, 1)])
  assert r["kinds"] == ["matmul", "other_fusion", "matmul", "matmul", "copy_transpose"]


def test_gpu_trace_counts_only_the_devices_kernels_under_their_instruction(tmp_path):
  meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
  events = [
      meta(1, "/host:CPU"),
      meta(7, "/device:GPU:0"),
      _x("ThunkExecutor::Execute", 0, 5000, pid=1),  # Host side: not a kernel on a GPU trace.
      _x("loop_add_fusion", 0, 30, pid=7, hlo_op="add_fusion.1"),
      _x("void cutlass::Kernel2<sm90_gemm>(Params)", 40, 50, pid=7, hlo_op="custom-call.2"),
      _x("void cutlass::Kernel2<sm90_gemm>(Params)", 100, 20, pid=7),  # No instruction named: its kernel name.
  ]
  r = _kernel_times(tmp_path, events)
  assert r["kernels"] == {
      "add_fusion.1": 0.015,
      "custom-call.2": 0.025,
      "void cutlass::Kernel2<sm90_gemm>(Params)": 0.01,
  }
  assert abs(r["idle_ms"] - (10 + 10) / 1e3 / 2) < 1e-9
