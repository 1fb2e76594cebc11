// Fused self-attention for x86 CPUs (AVX2 + FMA), an XLA FFI custom call (cpu_attention.py).
//
// softmax(q kᵀ) v without the N x N matrix, as FlashAttention tiles it: per (image, head,
// block of QB queries) the keys go by in blocks of KB with an online softmax (fp32 running
// max and sum), and the two matmuls run in register-blocked 6 x 16 micro-kernels on packed
// operands, so a block of logits stays in the L2 cache and is read twice (softmax, p·v)
// instead of being written out. Work items spread over XLA's intra-op threads. Semantics
// are those of the einsum path (attention.masked_softmax): a masked key's logit is replaced
// by -1e9, so a fully masked row averages every value uniformly.
//
// q [B, Nq, H, D] (already scaled), k/v [B, Nk, H, D], key mask [B, Nk] -> out [B, Nq, H, D],
// and per row the softmax's max and 1 / sum [B, H, Nq] (the backward's residuals).
// D must be a multiple of 16 (the Python side checks and falls back otherwise).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int MR = 6;     // rows of a micro-kernel tile
constexpr int NR = 16;    // columns (two 8-float registers)
// Blocks measured on a 2-core AMD EPYC (ms; 3 / 12 heads of 64 at 1024 and 4096 tokens):
//   96 x 256: 8.3 30.3 97 408; 48 x 256: 9.2 34.2 98 420; 96 x 512: 9.8 33.3 130 388;
//   192 x 256: 8.7 34.5 112 405; 144 x 128: 10.0 34.2 132 466.
constexpr int QB = 96;    // queries per work item (a multiple of MR)
constexpr int KB = 256;   // keys per step (a multiple of NR); QB x KB logits = 96 KiB
constexpr float kMasked = -1e9f;

// exp(x) for x <= 0, ~2 ulp (range reduction to [-ln2/2, ln2/2], a degree-6 polynomial,
// the power of two written into the exponent); exactly 0 below -87.3 and for -inf.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                                23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

// The micro-kernel of both matmuls: c[MR][NR] (row stride ldc) = a[MR][n] (row stride lda)
// · b[n][NR] (row stride ldb), added to c's values when `accumulate`. q·kᵀ: a = queries, b =
// a key panel packed as [d][NR]; p·v: a = probabilities, b = value rows.
inline void tile(const float* a, int lda, const float* b, int ldb, int n, float* c, int ldc,
                 bool accumulate) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = accumulate ? _mm256_load_ps(c + r * ldc) : _mm256_setzero_ps();
    acc[r][1] = accumulate ? _mm256_load_ps(c + r * ldc + 8) : _mm256_setzero_ps();
  }
  for (int t = 0; t < n; ++t) {
    __m256 b0 = _mm256_load_ps(b + t * ldb), b1 = _mm256_load_ps(b + t * ldb + 8);
    for (int r = 0; r < MR; ++r) {
      __m256 x = _mm256_broadcast_ss(a + r * lda + t);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(c + r * ldc, acc[r][0]);
    _mm256_store_ps(c + r * ldc + 8, acc[r][1]);
  }
}

inline float hmax(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct AlignedFloats {  // 32-byte aligned scratch, zeroed
  explicit AlignedFloats(size_t n)
      : ptr(static_cast<float*>(std::aligned_alloc(32, ((n * 4 + 31) / 32) * 32))) {
    if (ptr != nullptr) std::memset(ptr, 0, n * 4);
  }
  ~AlignedFloats() { std::free(ptr); }
  float* ptr;
};

struct Shapes {
  int64_t b, nq, nk, h, d, nk_pad;
};

// Keys of one (image, head) packed in panels of NR: [nk_pad / NR][d][NR]; values as rows
// [nk_pad][d]; padding zero.
void pack_keys(const float* k, const float* v, const Shapes& s, int64_t bi, int64_t hi,
               float* kp, float* vp) {
  const int64_t row = s.h * s.d;
  for (int64_t j = 0; j < s.nk; ++j) {
    const float* kj = k + (bi * s.nk + j) * row + hi * s.d;
    float* panel = kp + (j / NR) * s.d * NR + j % NR;
    for (int64_t t = 0; t < s.d; ++t) panel[t * NR] = kj[t];
    std::memcpy(vp + j * s.d, v + (bi * s.nk + j) * row + hi * s.d, s.d * 4);
  }
}

// One work item: queries [q0, q0 + QB) of (image bi, head hi).
void attend_block(const float* q, const float* kp, const float* vp, const float* fill,
                  const uint8_t* keep_all, const Shapes& s, int64_t bi, int64_t hi,
                  int64_t q0, float* qs, float* logits, float* acc, float* out,
                  float* row_max, float* inv_sum) {
  const int64_t row = s.h * s.d, d = s.d;
  const int64_t rows = std::min<int64_t>(QB, s.nq - q0);
  const int64_t tiles = (rows + MR - 1) / MR;
  std::memset(qs, 0, QB * d * 4);
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(qs + i * d, q + (bi * s.nq + q0 + i) * row + hi * s.d, d * 4);
  std::memset(acc, 0, QB * d * 4);
  float m[QB], l[QB];
  std::fill(m, m + QB, -INFINITY);
  std::fill(l, l + QB, 0.0f);
  for (int64_t k0 = 0; k0 < s.nk_pad; k0 += KB) {
    const int64_t n = std::min<int64_t>(KB, s.nk_pad - k0);
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t c = 0; c < n; c += NR)
        tile(qs + t * MR * d, d, kp + (k0 + c) * d, NR, d, logits + t * MR * KB + c, KB,
             false);
    const bool masked = !keep_all[k0 / KB];
    for (int64_t i = 0; i < tiles * MR; ++i) {
      float* si = logits + i * KB;
      if (masked)  // masked keys' logits become -1e9, padding -inf (fill)
        for (int64_t c = 0; c < n; ++c)
          if (fill[k0 + c] != 0.0f) si[c] = fill[k0 + c];
      __m256 mx = _mm256_set1_ps(-INFINITY);
      for (int64_t c = 0; c < n; c += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(si + c));
      const float m_new = std::max(m[i], hmax(mx));
      const __m256 shift = _mm256_set1_ps(m_new);
      __m256 sum = _mm256_setzero_ps();
      for (int64_t c = 0; c < n; c += 8) {
        __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(si + c), shift));
        _mm256_store_ps(si + c, p);
        sum = _mm256_add_ps(sum, p);
      }
      const float rescale = std::exp(m[i] - m_new);  // earlier keys, relative to the new max
      l[i] = l[i] * rescale + hsum(sum);
      m[i] = m_new;
      if (rescale != 1.0f) {
        const __m256 r = _mm256_set1_ps(rescale);
        for (int64_t c = 0; c < d; c += 8)
          _mm256_store_ps(acc + i * d + c, _mm256_mul_ps(r, _mm256_load_ps(acc + i * d + c)));
      }
    }
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t c = 0; c < d; c += NR)
        tile(logits + t * MR * KB, KB, vp + k0 * d + c, d, n, acc + t * MR * d + c, d, true);
  }
  const int64_t stat = (bi * s.h + hi) * s.nq + q0;
  for (int64_t i = 0; i < rows; ++i) {
    const float inv = 1.0f / l[i];
    row_max[stat + i] = m[i];
    inv_sum[stat + i] = inv;
    float* o = out + (bi * s.nq + q0 + i) * row + hi * s.d;
    for (int64_t c = 0; c < d; ++c) o[c] = acc[i * d + c] * inv;
  }
}

// Work items 0..n-1 over XLA's own intra-op threads (already running, so no thread starts
// and no competition with them): the calling thread and up to num_threads - 1 tasks on the
// pool pull items until none are left. The caller returns once every item is done; a task
// the pool starts late finds nothing to do and touches only the shared counters.
struct Items {
  explicit Items(int64_t n, std::function<void(int64_t)> fn) : n(n), fn(std::move(fn)) {}
  void work() {
    for (int64_t i = next++; i < n; i = next++) {
      fn(i);
      if (++done == n) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
  const int64_t n;
  const std::function<void(int64_t)> fn;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable all_done;
};

void parallel_for(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> fn) {
  auto items = std::make_shared<Items>(n, std::move(fn));
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([items] { items->work(); });
  items->work();
  std::unique_lock<std::mutex> lock(items->mu);
  items->all_done.wait(lock, [&] { return items->done.load() == n; });
}

// Per-thread scratch, kept between calls (one work item's query block, logits and
// accumulators).
float* scratch(size_t floats) {
  struct Buffer {
    ~Buffer() { std::free(ptr); }
    float* ptr = nullptr;
    size_t size = 0;
  };
  thread_local Buffer buffer;
  if (buffer.size < floats) {
    std::free(buffer.ptr);
    buffer.ptr = static_cast<float*>(std::aligned_alloc(32, (floats * 4 + 31) / 32 * 32));
    buffer.size = floats;
  }
  return buffer.ptr;
}

ffi::Error Attention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::PRED> key_mask, ffi::ResultBuffer<ffi::F32> out,
                     ffi::ResultBuffer<ffi::F32> row_max, ffi::ResultBuffer<ffi::F32> inv_sum,
                     ffi::ThreadPool pool) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  bool ok = qd.size() == 4 && kd.size() == 4 && vd.size() == 4 && qd[3] % NR == 0;
  for (int i = 0; ok && i < 4; ++i) ok = vd[i] == kd[i] && (i == 1 || qd[i] == kd[i]);
  if (!ok)
    return ffi::Error::InvalidArgument(
        "cpu attention: q [B, Nq, H, D], k = v [B, Nk, H, D], D a multiple of 16");
  Shapes s{qd[0], qd[1], kd[1], qd[2], qd[3], (kd[1] + NR - 1) / NR * NR};
  const int64_t blocks = (s.nk_pad + KB - 1) / KB;
  // Per image: each key's fill (0 = attended, -1e9 masked, -inf padding) and, per key
  // block, whether every key in it is attended (then no masking pass).
  std::vector<float> fill(s.b * s.nk_pad, -INFINITY);
  std::vector<uint8_t> keep_all(s.b * blocks, 1);
  const bool* mask = key_mask.typed_data();
  for (int64_t bi = 0; bi < s.b; ++bi)
    for (int64_t j = 0; j < s.nk_pad; ++j) {
      float f = j < s.nk ? (mask[bi * s.nk + j] ? 0.0f : kMasked) : -INFINITY;
      fill[bi * s.nk_pad + j] = f;
      if (f != 0.0f) keep_all[bi * blocks + j / KB] = 0;
    }
  const int64_t heads = s.b * s.h, panel = s.nk_pad * s.d;
  AlignedFloats kp(heads * panel), vp(heads * panel);
  if (kp.ptr == nullptr || vp.ptr == nullptr)
    return ffi::Error::Internal("cpu attention: out of memory packing keys and values");
  parallel_for(pool, heads, [&](int64_t i) {
    pack_keys(k.typed_data(), v.typed_data(), s, i / s.h, i % s.h, kp.ptr + i * panel,
              vp.ptr + i * panel);
  });
  const int64_t qblocks = (s.nq + QB - 1) / QB;
  parallel_for(pool, heads * qblocks, [&](int64_t i) {
    const int64_t hb = i / qblocks, bi = hb / s.h, hi = hb % s.h;
    float* base = scratch(QB * s.d * 2 + QB * KB);
    attend_block(q.typed_data(), kp.ptr + hb * panel, vp.ptr + hb * panel,
                 fill.data() + bi * s.nk_pad, keep_all.data() + bi * blocks, s, bi, hi,
                 (i % qblocks) * QB, base, base + QB * s.d, base + QB * s.d + QB * KB,
                 out->typed_data(), row_max->typed_data(), inv_sum->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StepJaxCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());
