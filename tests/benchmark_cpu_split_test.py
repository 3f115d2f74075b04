"""benchmarks/cpu_split.py's sample sorting on a synthetic `perf script` text (perf itself is not run here)."""

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "cpu_split.py")
_spec = importlib.util.spec_from_file_location("cpu_split", _PATH)
cpu_split = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_split)

LIB = "/x/jaxlib/libjax_common.so"
NATIVE = "/x/rflow_jax/model/native/native_cpu.so"


def _sample(comm, *frames):
  return "\n".join([f"{comm} 7 "] + [f"\t{ip} {sym} ({dso})" for ip, sym, dso in frames])


def test_split_sorts_worker_samples_and_decides_jit_code_by_caller_or_region():
  samples = [
      _sample("tf_XLAEigen", ("aa10", "ynn::dot_fp32_5x64x1_1x16x1_avx512", LIB)),
      _sample("tf_XLAEigen", ("bb20", "rflow_attention::MicroKernel<6, 2>", NATIVE)),
      _sample("tf_XLAEigen", ("bb30", "rflow_attention::(anonymous namespace)::BwdItem", NATIVE)),
      _sample("tf_XLAEigen", ("cc40", "Eigen::internal::gemm_pack_colmajor_block<float, long>", LIB)),
      _sample("tf_XLAEigen", ("dd50", "clear_page_erms", "[kernel.kallsyms]")),
      _sample("tf_XLAEigen", ("dd60", "_int_malloc", "/lib/libc.so.6")),
      # JIT code in region 0x7f00000 (oneDNN's, by its caller) and 0x7f10000 (XLA's, by its caller) ...
      _sample(
          "tf_XLAEigen", ("7f0000010", "[unknown]", "[JIT] tid 5"), ("1", "dnnl::impl::cpu::x64::gemm_driver", LIB)
      ),
      _sample("tf_XLAEigen", ("7f1000020", "[unknown]", "[JIT] tid 5"), ("2", "xla::cpu::Kernel::Launch", LIB)),
      # ... and callerless samples there: decided by their region's majority.
      _sample("tf_XLAEigen", ("7f0000030", "[unknown]", "[JIT] tid 5")),
      _sample("tf_XLAEigen", ("7f0000040", "[unknown]", "[JIT] tid 5")),
      _sample("tf_XLAEigen", ("7f1000050", "[unknown]", "[JIT] tid 5")),
      _sample("tf_XLAEigen", ("7f2000060", "[unknown]", "[unknown]")),  # A region nobody decided: oneDNN's.
      _sample("python", ("aa10", "ynn::dot_fp32_5x64x1_1x16x1_avx512", LIB)),  # Not a worker thread.
  ]
  counts = cpu_split.split("\n\n".join(samples) + "\n")
  assert dict(counts) == {
      "gemm_ynnpack": 1,
      "gemm_native": 1,
      "native_other": 1,
      "eigen_packing": 1,
      "page_faults": 1,
      "malloc": 1,
      "gemm_onednn": 4,
      "xla_fusions": 2,
  }
