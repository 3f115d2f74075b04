"""Where XLA:CPU's worker threads spend the train step's CPU time, by sampling them with Linux `perf`.

  python benchmarks/cpu_split.py [--steps=10] [train_step.py's --config flags ...]

The JAX profiler (benchmarks/profile_step.py) sees kernel launches, not the CPU: XLA:CPU's Eigen dots (the dense
layers' weight gradients) run asynchronously with no event of their own, and concurrent kernels share the two
cores. This script runs benchmarks/train_step.py (its flags pass through) under `perf record`, takes the leaf frame of
every sample on XLA's pool threads, and sorts it into: GEMM micro-kernels (YNNPACK's dots, oneDNN's JIT sgemm under
the Eigen dots, the native attention kernel's), the Eigen dots' operand packing, XLA's own fused kernels, the native
kernels' other work, page faults, malloc and the rest. It also runs benchmarks/fma_peak.cc: one core's float32 FMA
peak, the ceiling any GEMM kernel has here. Prints one JSON line: each category's share of the workers' samples,
the peak, train_step.py's own line, and the core-seconds per step that the GEMM kernels took.

Needs `perf` with permission to sample (perf_event_paranoid <= 2 for one's own processes) and a C++ compiler.
Compilation and the first steps are sampled too: use enough --steps (default 10) that they weigh little; page
faults (the first steps', while the allocator grows) are a category of their own.
"""

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = (
    "gemm_ynnpack",
    "gemm_onednn",
    "gemm_native",
    "eigen_packing",
    "xla_fusions",
    "native_other",
    "library_other",
    "page_faults",
    "malloc",
    "other",
)
GEMM = ("gemm_ynnpack", "gemm_onednn", "gemm_native")
_HEADER = re.compile(r"^\s*(\S+)\s+(\d+)\s*$")
_FRAME = re.compile(r"^\s*([0-9a-f]+)\s+(.*?)\s+\((.*)\)\s*$")


def _jit(dso: str) -> bool:
  return "JIT" in dso or "unknown" in dso or dso.startswith("/tmp/perf-")


def _leaf_category(sym: str, dso: str) -> str | None:
  """The category of a leaf frame; None for JIT-compiled code, which its callers or its address region decide."""
  if _jit(dso):
    return None
  if "ynn::dot" in sym:
    return "gemm_ynnpack"
  if "dnnl" in sym and "gemm" in sym:
    return "gemm_onednn"
  if "native_cpu" in dso:
    return "gemm_native" if re.search(r"MicroKernel|\bGemm\b", sym) else "native_other"
  if "gemm_pack" in sym:
    return "eigen_packing"
  if "kernel" in dso and re.search(r"clear_page|page_fault|do_anonymous_page|handle_mm_fault|alloc_pages", sym):
    return "page_faults"
  if "libc" in dso and re.search(r"malloc|free|unlink_chunk|memalign", sym):
    return "malloc"
  if re.search(r"ynn::|xnn|slinky::|Eigen::", sym):
    return "library_other"
  return "other"


def _jit_caller(frames) -> str | None:
  """oneDNN's sgemm or XLA's kernel launch, from the first non-JIT caller of a JIT-compiled leaf (None: unknown)."""
  for sym, dso in frames[1:]:
    if _jit(dso):
      continue
    if "dnnl" in sym:
      return "gemm_onednn"
    if "xla::cpu::" in sym:
      return "xla_fusions"
    return None
  return None


def split(perf_script: str, threads: str = "tf_XLA") -> collections.Counter:
  """Samples per category of the threads whose name starts with `threads`, from `perf script -F comm,tid,ip,sym,dso`.

  JIT-compiled leaves (oneDNN's sgemm kernels, XLA's fused kernels) have no symbol; each is decided by its first
  named caller, else by the majority of the decided samples whose leaf lies in the same 1 MiB of code (the two JITs
  place their code in separate regions), else as oneDNN's: XLA's kernels keep frame pointers (on the vs_diffusers
  step nearly all their samples named xla::cpu::Kernel::Launch), oneDNN's JIT sgemm does not (under 1% of its
  samples named a caller).
  """
  counts, undecided, regions = (
      collections.Counter(),
      collections.Counter(),
      collections.defaultdict(collections.Counter),
  )
  for block in perf_script.split("\n\n"):
    lines = [l for l in block.split("\n") if l.strip()]
    if not lines or not (m := _HEADER.match(lines[0])) or not m.group(1).startswith(threads):
      continue
    matches = [f for f in map(_FRAME.match, lines[1:]) if f]
    if not matches:
      continue
    frames = [(f.group(2), f.group(3)) for f in matches]  # (symbol, dso), leaf first.
    category = _leaf_category(*frames[0])
    if category is not None:
      counts[category] += 1
      continue
    region = int(matches[0].group(1), 16) >> 20
    caller = _jit_caller(frames)
    if caller is None:
      undecided[region] += 1
    else:
      counts[caller] += 1
      regions[region][caller] += 1
  for region, n in undecided.items():
    counts[regions[region].most_common(1)[0][0] if regions[region] else "gemm_onednn"] += n
  return counts


def fma_peak(cxx: str = os.environ.get("CXX", "g++")) -> float:
  """One core's float32 FMA GFLOP/s (benchmarks/fma_peak.cc)."""
  with tempfile.TemporaryDirectory() as d:
    exe = os.path.join(d, "fma_peak")
    subprocess.run(
        [cxx, "-O2", "-march=native", "-o", exe, os.path.join(ROOT, "benchmarks", "fma_peak.cc")], check=True
    )
    return json.loads(subprocess.run([exe], check=True, capture_output=True, text=True).stdout)["fma_gflops_per_core"]


def main(argv) -> int:
  args = argv[1:]
  if not any(a.startswith("--steps") for a in args):
    args.append("--steps=10")
  steps = int(next(a for a in args if a.startswith("--steps")).split("=", 1)[1])
  peak = fma_peak()
  with tempfile.TemporaryDirectory() as d:
    data = os.path.join(d, "perf.data")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), *args]
    rec = subprocess.run(
        ["perf", "record", "-q", "-F", "499", "-g", "-o", data, "--", *cmd], capture_output=True, text=True, cwd=ROOT
    )
    if rec.returncode:
      print(f"error: perf record failed ({rec.returncode}): {rec.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
      return 1
    step_line = json.loads(rec.stdout.strip().splitlines()[-1])
    script = subprocess.run(
        ["perf", "script", "-i", data, "-F", "comm,tid,ip,sym,dso"], capture_output=True, text=True, check=True
    ).stdout
  counts = split(script)
  total = sum(counts.values())
  share = {k: round(counts[k] / total, 4) for k in CATEGORIES}
  # Samples at 499 Hz: core-seconds per recorded step (compile and warm-up included, so an upper bound).
  gemm_core_s = sum(counts[k] for k in GEMM) / 499 / (steps + 1)
  print(
      json.dumps(
          {
              "worker_samples": total,
              "share": share,
              "gemm_share": round(sum(share[k] for k in GEMM), 4),
              "gemm_core_s_per_step": round(gemm_core_s, 3),
              "fma_gflops_per_core": peak,
              "train_step": step_line,
          }
      )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
