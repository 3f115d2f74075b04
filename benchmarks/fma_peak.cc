// One core's peak float32 FMA rate: 12 independent chains of 8-wide FMAs (AVX2, enough to hide the FMA latency
// on current x86 cores), as the ceiling a GEMM kernel can reach. Prints {"fma_gflops_per_core": x} (2 FLOPs per
// lane per FMA). Built and run by benchmarks/cpu_split.py with -O2 -march=native.
#include <immintrin.h>

#include <chrono>
#include <cstdio>

int main() {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(1e-3f * i);
  const __m256 mul = _mm256_set1_ps(0.999999f), add = _mm256_set1_ps(1e-7f);
  const long iters = 100000000;
  const auto t0 = std::chrono::steady_clock::now();
  for (long k = 0; k < iters; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], mul, add);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sink = 0.f;
  for (int i = 0; i < 12; ++i) sink += _mm256_cvtss_f32(acc[i]);  // Keeps the loop from being removed.
  std::printf("{\"fma_gflops_per_core\": %.1f, \"sink\": %g}\n", iters * 12.0 * 16.0 / s / 1e9, sink);
  return 0;
}
