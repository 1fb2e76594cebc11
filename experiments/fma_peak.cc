// The machine's fp32 FMA peak: the ceiling against which the peer bench's GFLOP/s are read
// (experiments/results/peer_bench_cpu/README.md). Each thread runs 12 independent AVX2 FMA
// chains (more than latency x ports, so the FMA units never wait), 16 flops per FMA.
//
//   c++ -O3 -funroll-loops -mavx2 -mfma -pthread experiments/fma_peak.cc -o /tmp/fma_peak
//   /tmp/fma_peak        # GFLOP/s with 1 thread and with every core
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

constexpr long kSteps = 40000000;   // per thread; 12 FMAs each

float chains() {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1e-3f * i);
  const __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-4f);
  for (long k = 0; k < kSteps; ++k)
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  float sum = 0, lanes[8];
  for (int i = 0; i < 12; ++i) {
    _mm256_storeu_ps(lanes, a[i]);
    sum += lanes[0];
  }
  return sum;   // used, so the loop is not optimised away
}

int main() {
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned threads : {1u, cores}) {
    std::vector<float> sums(threads);
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) pool.emplace_back([&sums, t] { sums[t] = chains(); });
    for (auto& t : pool) t.join();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%u thread(s): %.1f GFLOP/s (checksum %g)\n", threads,
                threads * kSteps * 12.0 * 16 / s / 1e9, sums[0]);
  }
}
