// Matrix-vector kernels for decoding on the CPU: weights stream from memory once per token, so the
// speed of batch-1 decoding is the speed at which these loops read weight bytes.
//
// int8 weights are multiplied with int8 activations quantized per row (one fp32 scale per token),
// summed exactly in int32 (AVX2's u8 x s8 multiply-add, or VNNI's vpdpbusd where the CPU has it);
// int4 weights the same way, with one float step per weight group. bf16 weights are widened to fp32
// and multiplied with fp32 activations. Rows of the weight matrix are split across torch's threads.
//
// Formats (all row-major, one row per output feature):
//   int8: weight int8 [N, K], scale fp32 [N]                  w[n, k] = scale[n] * q[n, k]
//   int4: weight uint8 [N, K/2], scale, min fp16 [N, K/G]     w[n, k] = scale[n, g] * q[n, k] + min[n, g]
//         each 32 values of a row take 16 bytes: byte i holds value i (low nibble) and i + 16 (high).
// Prompts (many rows) take the int8 GEMMs at the end of this file (AMX-INT8, else AVX-512 VNNI).
// The same formats are dequantized by stablecode/quantize.py, which is also the reference the
// tests compare these kernels against.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include <algorithm>
#include <atomic>
#include <memory>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SC_AVX2 1
#else
#define SC_AVX2 0
#endif

// The AMX prompt kernels are compiled for their instruction sets function by function (see below).
#if defined(__x86_64__) && defined(__GNUC__)
#define SC_AMX_BUILD 1
#include <immintrin.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define SC_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define SC_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#else
#define SC_AMX_BUILD 0
#endif

namespace {

constexpr int64_t kBlock = 32;   // the byte loops' step
constexpr int64_t kRowTile = 4;  // activation rows that share one read of a weight row (AVX2)
constexpr int64_t kVnniRowTile = 4;      // the same for 4-bit weights on VNNI CPUs (32 vector registers)
constexpr int64_t kVnniWeightRows = 4;   // int8 weights on VNNI: this many weight rows per pass, against
constexpr int64_t kVnniInt8RowTile = 5;  // up to this many activation rows

bool vnni_available();

// The VNNI decode loops reuse the AVX2 helpers (any VNNI CPU has AVX2, and the build's flags follow the CPU).
#define SC_VNNI_DECODE (SC_AMX_BUILD && SC_AVX2)

#if SC_AMX_BUILD
// acc += u8 · s8 in groups of four (vpdpbusd), in place. GCC's intrinsic, in functions compiled for
// VNNI by a target attribute, copies every accumulator to a fresh register around the instruction;
// in a loop of independent accumulators those copies, not the multiplies, set the speed
// (docs/performance.md). The asm names the accumulator as both input and output, so no copy is made.
SC_VNNI inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}
SC_VNNI inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}
#endif

// Rows per task: at least ~256 KiB of weights each, so small layers stay on one thread (a
// fork/join costs more than they do) and large ones are shared among all threads (parallel_rows).
inline int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(16, (256 << 10) / std::max<int64_t>(row_bytes, 1)); }

// fn(begin, end) over 0..n, each span taken by whichever thread is free next: first large ones
// (a quarter of the rows each, with two threads), then smaller, down to `grain` rows (guided
// scheduling). at::parallel_for splits the rows evenly up front, and on a shared machine one core
// is often slower than the other: the faster one then waited at the end of every call. Equal
// small tasks instead cut every thread's stream of weights short (docs/performance.md).
// Rows that fit one task (or a call from inside a parallel region) run on the calling thread.
template <typename F>
void parallel_rows(int64_t n, int64_t grain, const F& fn) {
  const int64_t tasks = (n + grain - 1) / std::max<int64_t>(grain, 1);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) fn(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int64_t start = next.load(std::memory_order_relaxed);
    while (start < n) {
      const int64_t size = std::max<int64_t>(grain, (n - start) / (2 * threads));
      if (next.compare_exchange_weak(start, start + size, std::memory_order_relaxed)) {
        fn(start, std::min(n, start + size));
        start = next.load(std::memory_order_relaxed);
      }
    }
  });
}

// The decode loops read each weight row once, front to back; asking for the line kPrefetchBytes
// ahead of the one being read keeps more misses in flight than the hardware prefetcher alone does
// (it stops at page boundaries). The distance matters little between 4 and 16 KiB on the Zen 4;
// on an AMX Xeon 4 and 8 KiB read a fifth slower than 16 (docs/performance.md). Prefetching past
// the matrix's end is harmless: prefetches never fault. The hint is non-temporal: what is streamed
// once per step (weights, the KV cache) then does not push the step's code and small tensors out of
// L2 and L3; on the Zen 4 that makes decode steps ~3% faster and the read probe ~10% (not measured
// on Intel CPUs yet).
constexpr int64_t kPrefetchBytes = 16384;
inline void prefetch_ahead(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes, 0, 0);
#endif
}

// The same into L2 (prefetcht1) for the int8 loops that take several activation rows per pass
// (VNNI) and the AVX2 one: there the non-temporal lines were evicted before their use (on the Zen 4,
// 3 rows against the 3B's weights cost 1.34x one row's pass that way, 1.05x this way, and the AVX2
// loop's one row got 1.43x faster; docs/performance.md). 64 KiB ahead beat 16 for 5-16 rows.
constexpr int64_t kKeptPrefetchBytes = 65536;
inline void prefetch_kept_ahead(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(static_cast<const char*>(p) + kKeptPrefetchBytes, 0, 2);
#endif
}

// The first kPrefetchBytes of a stream about to be read (at most `bytes`), which prefetch_ahead
// never asks for: for the short streams of decode attention (a head's keys or values at a
// 512-token context are 80 KB) those lines were a fifth of the stream.
inline void prefetch_start(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  for (int64_t offset = 0; offset < std::min(bytes, kPrefetchBytes); offset += 64)
    __builtin_prefetch(static_cast<const char*>(p) + offset, 0, 0);
#endif
}

// The same for every cache line of bytes [p, p + bytes).
inline void prefetch_span_ahead(const void* p, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += 64) prefetch_ahead(static_cast<const char*>(p) + offset);
}

float to_float(const float* p, int64_t i) { return p[i]; }
float to_float(const c10::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }
float to_float(const int8_t* p, int64_t i) { return static_cast<float>(p[i]); }  // an int8 KV cache's

#if SC_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 signed x 32 signed int8 products summed in pairs of four into 8 int32 lanes.
inline __m256i dot_s8s8(__m256i w, __m256i x) {
  const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
  return _mm256_madd_epi16(products, _mm256_set1_epi16(1));
}

// 32 unsigned 4-bit x 32 signed int8 products into 8 int32 lanes.
inline __m256i dot_u4s8(__m128i packed, __m256i x) {
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  const __m256i q = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
}

#endif

template <typename T>
void store(T* out, int64_t i, float v) { out[i] = static_cast<T>(v); }

float bias_at(const torch::Tensor& bias, int64_t n) {
  if (!bias.defined()) return 0.f;
  if (bias.scalar_type() == torch::kBFloat16) return static_cast<float>(bias.data_ptr<c10::BFloat16>()[n]);
  return bias.data_ptr<float>()[n];
}

// Each kernel computes `ROWS` activation rows against one weight row per pass, so the weight row
// is read once for all of them; ROWS is a template parameter so the accumulators stay in registers.

template <int ROWS, typename T>
void dispatch_rows(int64_t rows, T&& body) {
  static_assert(ROWS >= 1);
  if constexpr (ROWS > 1) {
    if (rows < ROWS) return dispatch_rows<ROWS - 1>(rows, body);
  }
  body(std::integral_constant<int, ROWS>{});
}

// ---- int8 weights -----------------------------------------------------------------------------
// Activations are quantized per row (token), as the prompt GEMMs below quantize them, and the
// int8 products are summed exactly in int32 over the whole row; `rescale` is the one float step,
// shared with the prompt GEMMs. So a row's output is the same bits whichever kernel computes it
// and however many rows share the call: a speculative pass of 9 tokens, a 3-token keystroke and a
// plain decode step agree with each other and with the prompt that filled the cache.

inline float rescale(int32_t acc, float sx, float sw, float b) { return std::fma(static_cast<float>(acc), sx * sw, b); }

struct RowQuantized {
  torch::Tensor q;          // int8 [M, K]
  torch::Tensor shifted;    // uint8 [M, K]: q + 128, vpdpbusd's unsigned operand
  torch::Tensor scale;      // fp32 [M]
};

// Symmetric int8 per row: scale = max|x| / 127, q = round-half-even(x * (127 / max|x|)).
// One row of K values: q[k], shifted[k] = q[k] + 128 (unless shifted is null) and *scale.
template <typename T>
void quantize_row(const T* src, int64_t K, int8_t* q, uint8_t* shifted, float* scale) {
  float amax = 0.f;
  int64_t k = 0;
#if SC_AVX2
  // The same steps 32 values at a time (a decode step quantizes ~570 K activations): max|x|, then
  // x * inv rounded to nearest even (the default mode, as nearbyint), saturated to int8 by the packs.
  const auto widen8 = [&](int64_t i) {
    if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(src + i);
    else return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))), 16));
  };
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const int64_t vector_end = K - K % 32;
  __m256 top = _mm256_setzero_ps();
  for (; k < vector_end; k += 8) top = _mm256_max_ps(_mm256_and_ps(widen8(k), magnitude), top);
  alignas(32) float tops[8];
  _mm256_store_ps(tops, top);
  for (float t : tops) amax = std::max(amax, t);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(to_float(src, k)));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  k = 0;
#if SC_AVX2
  const __m256 inv8 = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; k < vector_end; k += 32) {
    __m256i r[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(widen8(k + 8 * i), inv8));
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3])), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), bytes);
    if (shifted) _mm256_storeu_si256(reinterpret_cast<__m256i*>(shifted + k), _mm256_xor_si256(bytes, _mm256_set1_epi8(-128)));
  }
#endif
  for (; k < K; ++k) {
    const int32_t r = std::clamp(static_cast<int32_t>(std::nearbyint(to_float(src, k) * inv)), -128, 127);
    q[k] = static_cast<int8_t>(r);
    if (shifted) shifted[k] = static_cast<uint8_t>(r + 128);
  }
  *scale = amax / 127.f;
}

template <typename T>
RowQuantized quantize_rows_impl(const torch::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  RowQuantized out{torch::empty({M, K}, x.options().dtype(torch::kInt8)),
                   torch::empty({M, K}, x.options().dtype(torch::kUInt8)),
                   torch::empty({M}, x.options().dtype(torch::kFloat32))};
  const T* src = x.data_ptr<T>();
  int8_t* q = out.q.data_ptr<int8_t>();
  uint8_t* shifted = out.shifted.data_ptr<uint8_t>();
  float* scale = out.scale.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) quantize_row(src + m * K, K, q + m * K, shifted + m * K, scale + m);
  return out;
}

RowQuantized quantize_rows(const torch::Tensor& x) {
  if (x.scalar_type() == torch::kBFloat16) return quantize_rows_impl<c10::BFloat16>(x);
  return quantize_rows_impl<float>(x);
}

#if SC_AVX2
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// sum_k w[k] * x[r, k] for ROWS rows: |x| times (w with x's sign), 32 bytes a step. (Weights are
// in [-127, 127], as quantize_int8 makes them, so flipping a weight's sign never overflows.)
template <int ROWS>
void int8_row(const int8_t* w, const int8_t* xq, int64_t K, int32_t* total) {
#if SC_AVX2
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K; k += kBlock) {
    if (k % 64 == 0) prefetch_kept_ahead(w + k);
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    for (int r = 0; r < ROWS; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + k));
      // pairs of |x| * ±w stay within int16 (2 * 128 * 127); madd widens them to int32.
      const __m256i products = _mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(wv, xv));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(products, ones));
    }
  }
  for (int r = 0; r < ROWS; ++r) total[r] = hsum_epi32(acc[r]);
#else
  for (int r = 0; r < ROWS; ++r) {
    int32_t t = 0;
    for (int64_t k = 0; k < K; ++k) t += int32_t(w[k]) * xq[r * K + k];
    total[r] = t;
  }
#endif
}

#if SC_VNNI_DECODE
// The same sums with AVX-512 VNNI's vpdpbusd: (x + 128) times w, one instruction per 32 bytes,
// then 128 x (the weight row's sum, computed once when the layer was quantized) off. A pass takes
// NW weight rows and ROWS activation rows, so each load of either feeds several products: with one
// weight row per pass the activation rows are re-read from L2 for every weight row, which bounds speed.
template <int ROWS, int NW>
SC_VNNI void int8_tile_vnni(const int8_t* w, const uint8_t* xu, int64_t K, int32_t* total) {
  __m256i acc[ROWS][NW];
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < NW; ++j) acc[r][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K; k += kBlock) {
    __m256i wv[NW];
    for (int j = 0; j < NW; ++j) {
      if (k % 64 == 0) prefetch_kept_ahead(w + j * K + k);
      wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + k));
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xu + r * K + k));
      for (int j = 0; j < NW; ++j) acc[r][j] = dpbusd(acc[r][j], xv, wv[j]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < NW; ++j) total[r * NW + j] = hsum_epi32(acc[r][j]);
}

// One activation row (a decode step) against weight rows begin .. end, the same (x + 128) · w
// products on the full 512-bit width: two loads and one vpdpbusd per 64 weight bytes. Each weight
// row is one sequential stream, 128 bytes a step into two accumulators (one alone waits on
// vpdpbusd's latency: a Zen 5 then read int8 weights slower than bf16 ones).
template <typename T>
SC_VNNI void int8_vector_vnni(const uint8_t* xu, float xs, const int8_t* w, const float* ws, const int32_t* sums,
                              const float* bias, int64_t K, int64_t begin, int64_t end, T* y) {
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* row = w + n * K;
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
      prefetch_ahead(row + k);
      prefetch_ahead(row + k + 64);
      acc0 = dpbusd(acc0, _mm512_loadu_si512(xu + k), _mm512_loadu_si512(row + k));
      acc1 = dpbusd(acc1, _mm512_loadu_si512(xu + k + 64), _mm512_loadu_si512(row + k + 64));
    }
    for (; k < K; k += 64) {  // K is a multiple of 32: whole 64s, then perhaps one 32
      prefetch_ahead(row + k);
      const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
      acc0 = dpbusd(acc0, _mm512_maskz_loadu_epi8(mask, xu + k), _mm512_maskz_loadu_epi8(mask, row + k));
    }
    const int32_t total = _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1)) - 128 * sums[n];
    store(y, n, rescale(total, xs, ws[n], bias ? bias[n] : 0.f));
  }
}

// Weight rows n0 .. n0 + NW against every activation row.
template <int NW, typename T>
SC_VNNI void int8_weight_rows_vnni(const RowQuantized& a, const int8_t* w, const float* ws, const int32_t* sums,
                                   const float* bias, int64_t n0, int64_t N, T* y) {
  const int64_t M = a.q.size(0), K = a.q.size(1);
  const uint8_t* xu = a.shifted.data_ptr<uint8_t>();
  const float* xs = a.scale.data_ptr<float>();
  float b[NW];
  for (int j = 0; j < NW; ++j) b[j] = bias ? bias[n0 + j] : 0.f;
  // Each tile of rows is one more pass over these weight rows (from L2), so as few as fit, evenly
  // filled: 9 rows as 5 + 4, not 4 + 4 + 1.
  const int64_t tiles = (M + kVnniInt8RowTile - 1) / kVnniInt8RowTile, tile_rows = (M + tiles - 1) / tiles;
  for (int64_t m0 = 0; m0 < M; m0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, M - m0);
    int32_t total[kVnniInt8RowTile * NW];
    dispatch_rows<kVnniInt8RowTile>(rows, [&](auto r) {
      int8_tile_vnni<r(), NW>(w + n0 * K, xu + m0 * K, K, total);
    });
    for (int64_t r = 0; r < rows; ++r)
      for (int j = 0; j < NW; ++j)
        store(y, (m0 + r) * N + n0 + j, rescale(total[r * NW + j] - 128 * sums[n0 + j], xs[m0 + r], ws[n0 + j], b[j]));
  }
}
#endif

template <typename T>
void int8_linear_impl(const RowQuantized& a, const torch::Tensor& weight, const torch::Tensor& scale,
                      const torch::Tensor& row_sums, const float* bias, bool vnni, torch::Tensor& out) {
  const int64_t M = a.q.size(0), K = a.q.size(1), N = weight.size(0);
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float* xs = a.scale.data_ptr<float>();
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* ws = scale.data_ptr<float>();
  T* y = out.data_ptr<T>();
#if SC_VNNI_DECODE
  const int32_t* sums = row_sums.data_ptr<int32_t>();
  if (vnni && M == 1) {
    parallel_rows(N, grain_rows(K), [&](int64_t begin, int64_t end) {
      int8_vector_vnni(a.shifted.data_ptr<uint8_t>(), xs[0], w, ws, sums, bias, K, begin, end, y);
    });
    return;
  }
  if (vnni) {
    const int64_t groups = (N + kVnniWeightRows - 1) / kVnniWeightRows;
    parallel_rows(groups, std::max<int64_t>(1, grain_rows(K) / kVnniWeightRows), [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t n0 = g * kVnniWeightRows;
        if (n0 + kVnniWeightRows <= N) {
          int8_weight_rows_vnni<kVnniWeightRows>(a, w, ws, sums, bias, n0, N, y);
        } else {
          for (int64_t n = n0; n < N; ++n) int8_weight_rows_vnni<1>(a, w, ws, sums, bias, n, N, y);
        }
      }
    });
    return;
  }
#endif
  parallel_rows(N, grain_rows(K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float b = bias ? bias[n] : 0.f;
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, M - m0);
        int32_t total[kRowTile];
        dispatch_rows<kRowTile>(rows, [&](auto r) { int8_row<r()>(w + n * K, xq + m0 * K, K, total); });
        for (int64_t r = 0; r < rows; ++r) store(y, (m0 + r) * N + n, rescale(total[r], xs[m0 + r], ws[n], b));
      }
    }
  });
}

// ---- int4 weights -----------------------------------------------------------------------------

inline float half_to_float(const c10::Half* p, int64_t i) {
#if SC_AVX2
  return _cvtsh_ss(reinterpret_cast<const uint16_t*>(p)[i]);
#else
  return static_cast<float>(p[i]);
#endif
}

// Activations per row (token) as for int8. Each group's 4-bit values (0..15) times q are summed
// exactly in int32 (D), and the one float step, `add_groups`, takes eight groups at a time:
// acc += D · scale + (the group's sum of q) · min. Every loop below feeds it the same exact sums in
// the same lanes, so all of them, at any number of rows, give the same bits.
#if SC_AVX2
inline __m256i unpack_u4(const uint8_t* p) {  // 16 bytes -> 32 values, in the storage order
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
}

inline __m256 add_groups(__m256 acc, __m256i dots, const c10::Half* ws, const c10::Half* wm, const float* xg) {
  const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws)));
  const __m256 minimum = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wm)));
  return _mm256_fmadd_ps(minimum, _mm256_loadu_ps(xg), _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc));
}

// The last `count` < 8 groups, through zero-padded copies (0 · 0 leaves acc as it is).
inline __m256 add_groups_tail(__m256 acc, const int32_t* dots, int64_t count, const c10::Half* ws,
                              const c10::Half* wm, const float* xg) {
  alignas(32) int32_t d[8] = {0};
  alignas(32) float x[8] = {0.f};
  alignas(16) c10::Half s[8], m[8];
  for (int i = 0; i < 8; ++i) s[i] = m[i] = c10::Half(0.f);
  for (int64_t i = 0; i < count; ++i) d[i] = dots[i], x[i] = xg[i], s[i] = ws[i], m[i] = wm[i];
  return add_groups(acc, _mm256_load_si256(reinterpret_cast<const __m256i*>(d)), s, m, x);
}

// Eight groups' 8-lane partial sums → their eight totals, in group order.
inline __m256i reduce8(const __m256i d[8]) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}
#endif

#if SC_AVX2
// The loop of int4_row and int4_row_vnni: `block_dot(q, x, dot)` adds 32 products of 4-bit values q
// and activations x into dot's 8 lanes, with whichever instruction the caller has.
template <int ROWS, typename BlockDot>
__attribute__((always_inline)) inline void int4_rows_with(const uint8_t* row, const c10::Half* ws, const c10::Half* wm,
                                                          const int8_t* xq, const float* xg, int64_t K,
                                                          int64_t group_size, float* total, BlockDot block_dot) {
  const int64_t groups = K / group_size;
  __m256 acc[ROWS];
  alignas(32) int32_t dots[ROWS][8];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const int64_t count = std::min<int64_t>(8, groups - g0);
    for (int64_t i = 0; i < count; ++i) {
      __m256i dot[ROWS];
      for (int r = 0; r < ROWS; ++r) dot[r] = _mm256_setzero_si256();
      for (int64_t k = (g0 + i) * group_size; k < (g0 + i + 1) * group_size; k += kBlock) {
        if (k % 128 == 0) prefetch_ahead(row + k / 2);
        const __m256i q = unpack_u4(row + k / 2);
        for (int r = 0; r < ROWS; ++r)
          dot[r] = block_dot(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + k)), dot[r]);
      }
      for (int r = 0; r < ROWS; ++r) dots[r][i] = hsum_epi32(dot[r]);
    }
    for (int r = 0; r < ROWS; ++r)
      acc[r] = count == 8 ? add_groups(acc[r], _mm256_load_si256(reinterpret_cast<const __m256i*>(dots[r])), ws + g0,
                                       wm + g0, xg + r * groups + g0)
                          : add_groups_tail(acc[r], dots[r], count, ws + g0, wm + g0, xg + r * groups + g0);
  }
  for (int r = 0; r < ROWS; ++r) total[r] = hsum(acc[r]);
}
#endif

template <int ROWS>
void int4_row(const uint8_t* row, const c10::Half* ws, const c10::Half* wm, const int8_t* xq, const float* xg,
              int64_t K, int64_t group_size, float* total) {
#if SC_AVX2
  const __m256i ones = _mm256_set1_epi16(1);
  int4_rows_with<ROWS>(row, ws, wm, xq, xg, K, group_size, total, [&](__m256i q, __m256i x, __m256i dot) {
    return _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones));  // ≤ 2·15·128
  });
#else
  const int64_t groups = K / group_size;
  for (int r = 0; r < ROWS; ++r) {
    float t = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t d = 0;
      for (int64_t k = g * group_size; k < (g + 1) * group_size; k += kBlock)
        for (int64_t i = 0; i < kBlock / 2; ++i) {
          const uint8_t byte = row[k / 2 + i];
          d += int32_t(byte & 0x0F) * xq[r * K + k + i] + int32_t(byte >> 4) * xq[r * K + k + i + kBlock / 2];
        }
      t = std::fma(half_to_float(wm, g), xg[r * groups + g], std::fma(float(d), half_to_float(ws, g), t));
    }
    total[r] = t;
  }
#endif
}

#if SC_AVX2
// One activation row (a decode step) with groups of 64: eight groups' sums are reduced together
// (reduce8) instead of one by one, which is most of the float work per byte of weights.
inline float int4_vector(const uint8_t* row, const c10::Half* ws, const c10::Half* wm, const int8_t* xq,
                         const float* xg, int64_t K) {
  const int64_t groups = K / 64;
  const __m256i ones = _mm256_set1_epi16(1);
  auto group_dot = [&](int64_t g) {
    const int64_t k = g * 64;
    if (g % 2 == 0) prefetch_ahead(row + k / 2);
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k + 32));
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(unpack_u4(row + k / 2), x0), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(unpack_u4(row + k / 2 + 16), x1), ones));
  };
  __m256 acc = _mm256_setzero_ps();
  int64_t g0 = 0;
  for (; g0 + 8 <= groups; g0 += 8) {
    __m256i d[8];
    for (int i = 0; i < 8; ++i) d[i] = group_dot(g0 + i);
    acc = add_groups(acc, reduce8(d), ws + g0, wm + g0, xg + g0);
  }
  if (g0 < groups) {
    int32_t dots[8];
    for (int64_t g = g0; g < groups; ++g) dots[g - g0] = hsum_epi32(group_dot(g));
    acc = add_groups_tail(acc, dots, groups - g0, ws + g0, wm + g0, xg + g0);
  }
  return hsum(acc);
}
#endif

#if SC_VNNI_DECODE
// The same with vpdpbusd (4-bit values unsigned, activations signed: no sign trick needed).
template <int ROWS>
SC_VNNI void int4_row_vnni(const uint8_t* row, const c10::Half* ws, const c10::Half* wm, const int8_t* xq,
                           const float* xg, int64_t K, int64_t group_size, float* total) {
  int4_rows_with<ROWS>(row, ws, wm, xq, xg, K, group_size, total,
                       [](__m256i q, __m256i x, __m256i dot) SC_VNNI { return dpbusd(dot, q, x); });
}

// Four pair products (groups g0..g0+7, see int4_rows_vnni) → the eight groups' sums in group order.
SC_VNNI inline __m256i ordered_group_sums(__m512i s01, __m512i s23, __m512i s45, __m512i s67) {
  // Within each 128-bit quarter: quarters 0-1 hold groups (0, 2 | 4, 6), quarters 2-3 (1, 3 | 5, 7).
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(s01, s23), _mm512_unpackhi_epi32(s01, s23));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(s45, s67), _mm512_unpackhi_epi32(s45, s67));
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m512i paired = _mm512_shuffle_i64x2(u, u, _MM_SHUFFLE(3, 1, 2, 0));
  const __m256i sums = _mm256_add_epi32(_mm512_castsi512_si256(paired), _mm512_extracti64x4_epi64(paired, 1));
  // sums = groups 0, 2, 4, 6, 1, 3, 5, 7 → in order
  const __m512i natural = _mm512_castsi256_si512(_mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  return _mm512_castsi512_si256(_mm512_permutexvar_epi32(natural, _mm512_castsi256_si512(sums)));
}

// Groups 2i and 2i + 1 (their nibbles lo and hi) against their permuted activations (128 bytes).
SC_VNNI inline __m512i int4_pair_dot(__m512i lo, __m512i hi, const int8_t* x) {
  return dpbusd(dpbusd(_mm512_setzero_si512(), lo, _mm512_loadu_si512(x)), hi, _mm512_loadu_si512(x + 64));
}

// Groups g0..groups-1 (fewer than 8, past the last whole eight) of one activation row, one at a time
// from its natural-order activations xq: the tail of both loops below.
SC_VNNI inline __m256 int4_tail_groups_vnni(__m256 acc, const uint8_t* row, const c10::Half* ws, const c10::Half* wm,
                                           const int8_t* xq, const float* xg, int64_t g0, int64_t groups) {
  int32_t dots[8];
  for (int64_t g = g0; g < groups; ++g) {
    __m256i dot = _mm256_setzero_si256();
    for (int64_t k = g * 64; k < (g + 1) * 64; k += kBlock)
      dot = dpbusd(dot, unpack_u4(row + k / 2), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k)));
    dots[g - g0] = hsum_epi32(dot);
  }
  return add_groups_tail(acc, dots, groups - g0, ws + g0, wm + g0, xg + g0);
}

// One activation row with groups of 64, as int4_rows_vnni below, each pair of groups split into nibbles
// as it is read: a decode step through int4_rows_vnni<1> and the 2-16-row loop decoded 3-8% slower.
SC_VNNI float int4_vector_vnni(const uint8_t* row, const c10::Half* ws, const c10::Half* wm, const int8_t* xp,
                               const int8_t* xq, const float* xg, int64_t K) {
  const int64_t groups = K / 64;
  const __m512i low = _mm512_set1_epi8(0x0F);
  auto pair_dot = [&](int64_t pair) SC_VNNI {
    prefetch_ahead(row + pair * 64);
    const __m512i packed = _mm512_loadu_si512(row + pair * 64);
    return int4_pair_dot(_mm512_and_si512(packed, low), _mm512_and_si512(_mm512_srli_epi16(packed, 4), low),
                         xp + pair * 128);
  };
  __m256 acc = _mm256_setzero_ps();
  int64_t g0 = 0;
  for (; g0 + 8 <= groups; g0 += 8) {
    const __m256i sums = ordered_group_sums(pair_dot(g0 / 2), pair_dot(g0 / 2 + 1), pair_dot(g0 / 2 + 2), pair_dot(g0 / 2 + 3));
    acc = add_groups(acc, sums, ws + g0, wm + g0, xg + g0);
  }
  if (g0 < groups) acc = int4_tail_groups_vnni(acc, row, ws, wm, xq, xg, g0, groups);
  return hsum(acc);
}

// ROWS activation rows against one weight row with groups of 64, 512 bits at a time: 64 bytes (two
// groups) are one load, split once for all rows into their low nibbles and their high nibbles, which
// multiply each row's activations permuted into that order (`xp`, rows `xp_stride` apart, see
// int4_linear_impl), so a register's lanes 0-7 sum one group and lanes 8-15 the next. Eight groups'
// sums are then reduced together.
template <int ROWS>
SC_VNNI void int4_rows_vnni(const uint8_t* row, const c10::Half* ws, const c10::Half* wm, const int8_t* xp,
                            int64_t xp_stride, const int8_t* xq, const float* xg, int64_t K, float* total) {
  const int64_t groups = K / 64;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  int64_t g0 = 0;
  for (; g0 + 8 <= groups; g0 += 8) {
    const uint8_t* w = row + g0 * 32;
    prefetch_ahead(w), prefetch_ahead(w + 64), prefetch_ahead(w + 128), prefetch_ahead(w + 192);
    const __m512i p0 = _mm512_loadu_si512(w), p1 = _mm512_loadu_si512(w + 64), p2 = _mm512_loadu_si512(w + 128),
                  p3 = _mm512_loadu_si512(w + 192);
    const __m512i l0 = _mm512_and_si512(p0, low), h0 = _mm512_and_si512(_mm512_srli_epi16(p0, 4), low);
    const __m512i l1 = _mm512_and_si512(p1, low), h1 = _mm512_and_si512(_mm512_srli_epi16(p1, 4), low);
    const __m512i l2 = _mm512_and_si512(p2, low), h2 = _mm512_and_si512(_mm512_srli_epi16(p2, 4), low);
    const __m512i l3 = _mm512_and_si512(p3, low), h3 = _mm512_and_si512(_mm512_srli_epi16(p3, 4), low);
    for (int r = 0; r < ROWS; ++r) {
      const int8_t* x = xp + r * xp_stride + g0 * 64;
      const __m256i sums = ordered_group_sums(int4_pair_dot(l0, h0, x), int4_pair_dot(l1, h1, x + 128),
                                              int4_pair_dot(l2, h2, x + 256), int4_pair_dot(l3, h3, x + 384));
      acc[r] = add_groups(acc[r], sums, ws + g0, wm + g0, xg + r * groups + g0);
    }
  }
  for (int r = 0; r < ROWS && g0 < groups; ++r)
    acc[r] = int4_tail_groups_vnni(acc[r], row, ws, wm, xq + r * K, xg + r * groups, g0, groups);
  for (int r = 0; r < ROWS; ++r) total[r] = hsum(acc[r]);
}
#endif

// Per 128 values (two groups, 64 bytes) of each of the M rows: the activations of their low nibbles,
// then of their high ones; byte b of 64 is value (b / 32)·64 + (b % 32 / 16)·32 + b % 16, and that
// plus 16. Only the first `paired` values of a row (whole runs of 8 groups) are permuted; the loops
// read the rest in xq's natural order.
inline std::vector<int8_t> pair_order(const int8_t* xq, int64_t M, int64_t K, int64_t paired) {
  std::vector<int8_t> permuted(M * paired);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t base = 0; base < paired; base += 128)
      for (int64_t b = 0; b < 64; ++b) {
        const int64_t v = m * K + base + (b / 32) * 64 + (b % 32 / 16) * 32 + b % 16;
        permuted[m * paired + base + b] = xq[v], permuted[m * paired + base + 64 + b] = xq[v + 16];
      }
  return permuted;
}

template <typename T>
void int4_linear_impl(const RowQuantized& a, const torch::Tensor& weight, const torch::Tensor& scale,
                      const torch::Tensor& minimum, int64_t group_size, const float* bias, bool vnni,
                      torch::Tensor& out) {
  const int64_t M = a.q.size(0), K = a.q.size(1), N = weight.size(0), groups = K / group_size;
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float* xs = a.scale.data_ptr<float>();
  // Sum of the quantized activations per weight group (exact in fp32): multiplies each group's minimum.
  std::vector<float> group_sums(M * groups, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) sum += xq[m * K + k];
      group_sums[m * groups + g] = static_cast<float>(sum);
    }
  const float* xg = group_sums.data();
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const c10::Half* ws = scale.data_ptr<c10::Half>();
  const c10::Half* wm = minimum.data_ptr<c10::Half>();
  T* y = out.data_ptr<T>();
#if SC_AVX2
  if (M == 1 && group_size == 64) {
    const int64_t paired = vnni ? K / 512 * 512 : 0;
    const std::vector<int8_t> permuted = pair_order(xq, M, K, paired);
    const int8_t* xp = permuted.data();
    parallel_rows(N, grain_rows(K / 2), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const uint8_t* row = w + n * (K / 2);
#if SC_VNNI_DECODE
        const float total = vnni ? int4_vector_vnni(row, ws + n * groups, wm + n * groups, xp, xq, xg, K)
                                 : int4_vector(row, ws + n * groups, wm + n * groups, xq, xg, K);
#else
        const float total = int4_vector(row, ws + n * groups, wm + n * groups, xq, xg, K);
#endif
        store(y, n, std::fma(total, xs[0], bias ? bias[n] : 0.f));
      }
    });
    return;
  }
#endif
#if SC_VNNI_DECODE
  if (vnni && group_size == 64) {  // 2-16 rows: each weight row split into nibbles once for kVnniRowTile of them
    const int64_t paired = K / 512 * 512;
    const std::vector<int8_t> permuted = pair_order(xq, M, K, paired);
    const int8_t* xp = permuted.data();
    parallel_rows(N, grain_rows(K / 2), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const uint8_t* row = w + n * (K / 2);
        const float b = bias ? bias[n] : 0.f;
        for (int64_t m0 = 0; m0 < M; m0 += kVnniRowTile) {
          float total[kVnniRowTile];
          dispatch_rows<kVnniRowTile>(std::min(kVnniRowTile, M - m0), [&](auto rows) {
            int4_rows_vnni<rows()>(row, ws + n * groups, wm + n * groups, xp + m0 * paired, paired, xq + m0 * K,
                                   xg + m0 * groups, K, total);
            for (int r = 0; r < rows(); ++r) store(y, (m0 + r) * N + n, std::fma(total[r], xs[m0 + r], b));
          });
        }
      }
    });
    return;
  }
#endif
  parallel_rows(N, grain_rows(K / 2), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float b = bias ? bias[n] : 0.f;
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, M - m0);
        float total[kRowTile];
        const uint8_t* row = w + n * (K / 2);
#if SC_VNNI_DECODE
        if (vnni) {
          dispatch_rows<kRowTile>(rows, [&](auto r) {
            int4_row_vnni<r()>(row, ws + n * groups, wm + n * groups, xq + m0 * K, xg + m0 * groups, K, group_size, total);
          });
        } else
#endif
        {
          dispatch_rows<kRowTile>(rows, [&](auto r) {
            int4_row<r()>(row, ws + n * groups, wm + n * groups, xq + m0 * K, xg + m0 * groups, K, group_size, total);
          });
        }
        for (int64_t r = 0; r < rows; ++r) store(y, (m0 + r) * N + n, std::fma(total[r], xs[m0 + r], b));
      }
    }
  });
}

// ---- bf16 weights -----------------------------------------------------------------------------

// bf16 is the top half of an fp32: interleaving 16-bit zeros below the weights makes fp32 values
// without shifts. The interleave works within 128-bit lanes, so each run of 16 weights comes out in
// the order [0-3, 8-11 | 4-7, 12-15]; the activations are permuted once to match (`x_perm`).
template <int ROWS>
void bf16_row(const c10::BFloat16* row, const float* x_perm, const float* x, int64_t K, float* total) {
  int64_t k = 0;
#if SC_AVX2
  __m256 acc0[ROWS], acc1[ROWS];
  for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  const __m256i zero = _mm256_setzero_si256();
  for (; k + 16 <= K; k += 16) {
    if (k % 32 == 0) prefetch_ahead(row + k);
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
    const __m256 w0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
    const __m256 w1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
    for (int r = 0; r < ROWS; ++r) {
      acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x_perm + r * K + k), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x_perm + r * K + k + 8), acc1[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) total[r] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
#else
  for (int r = 0; r < ROWS; ++r) total[r] = 0.f;
#endif
  for (int r = 0; r < ROWS; ++r)
    for (int64_t i = k; i < K; ++i) total[r] += static_cast<float>(row[i]) * x[r * K + i];
}

template <typename T>
void bf16_linear_impl(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                      torch::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  torch::Tensor x_perm = xf.clone();
  const int64_t whole = K / 16 * 16;
  if (whole > 0) {
    // [.., 16] → 4 quarters of 4 → order 0, 2, 1, 3 (see bf16_row).
    x_perm.narrow(1, 0, whole).view({M, whole / 16, 4, 4}).copy_(
        xf.narrow(1, 0, whole).reshape({M, whole / 16, 2, 2, 4}).transpose(2, 3).reshape({M, whole / 16, 4, 4}));
  }
  const float* xp = x_perm.data_ptr<float>();
  const float* xr = xf.data_ptr<float>();
  const c10::BFloat16* w = weight.data_ptr<c10::BFloat16>();
  T* y = out.data_ptr<T>();
  parallel_rows(N, grain_rows(2 * K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float b = bias_at(bias, n);
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        float total[kRowTile];
        dispatch_rows<kRowTile>(M - m0, [&](auto rows) {
          bf16_row<rows()>(w + n * K, xp + m0 * K, xr + m0 * K, K, total);
          for (int r = 0; r < rows(); ++r) store(y, (m0 + r) * N + n, total[r] + b);
        });
      }
    }
  });
}


// ---- attention of one new token over the KV cache ---------------------------------------------
// Decoding attends one query per (row, head) to L cached keys and values: a pass over the cache,
// bound by memory. PyTorch's CPU attention runs bf16 caches through emulated bf16 arithmetic,
// several times slower than this loop, which widens each key and value to fp32 as it reads it.

#if SC_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

template <typename T>
float dot_row(const float* q, const T* k, int64_t D) {
  int64_t d = 0;
  float total = 0.f;
#if SC_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), acc);
  total = hsum(acc);
#endif
  for (; d < D; ++d) total += q[d] * to_float(k, d);
  return total;
}

#if SC_AVX2
// Lane i = the sum of a[i]'s lanes.
inline __m256 transpose_sum8(const __m256 a[8]) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// Scores of 8 consecutive keys: each key sums in its own register, because one key's sum alone
// (D / 8 dependent FMAs, then a horizontal sum) waits on the FMA latency rather than on memory.
template <typename T>
inline __m256 dot_rows8(const float* q, const T* k, int64_t stride, int64_t D) {
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qv, load8(k + i * stride + d), acc[i]);
  }
  __m256 scores = transpose_sum8(acc);
  if (d < D) {
    alignas(32) float rest[8];
    _mm256_store_ps(rest, scores);
    for (int i = 0; i < 8; ++i)
      for (int64_t e = d; e < D; ++e) rest[i] += q[e] * to_float(k + i * stride, e);
    scores = _mm256_load_ps(rest);
  }
  return scores;
}

// e^x for x <= 0 (scores minus their maximum): 2^n · p(f), degree-6 polynomial (the prefill kernel's too).
inline __m256 exp8_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), f);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));  // n >= -126: a normal 2^n
}

// acc (CHUNKS × 8 floats, in registers) += p_j v_j over the keys: one pass over the values.
template <int CHUNKS, typename T>
void weighted_values(const float* p, const T* v, int64_t stride, int64_t length, float* out) {
  __m256 acc[CHUNKS];
  for (int c = 0; c < CHUNKS; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < length; ++j) {
    prefetch_span_ahead(v + j * stride, CHUNKS * 8 * sizeof(T));
    const __m256 pj = _mm256_set1_ps(p[j]);
    for (int c = 0; c < CHUNKS; ++c) acc[c] = _mm256_fmadd_ps(pj, load8(v + j * stride + 8 * c), acc[c]);
  }
  for (int c = 0; c < CHUNKS; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}
#endif

template <typename T>
void add_scaled_row(float* acc, const T* v, float p, int64_t D) {
  int64_t d = 0;
#if SC_AVX2
  const __m256 pv = _mm256_set1_ps(p);
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, load8(v + d), _mm256_loadu_ps(acc + d)));
#endif
  for (; d < D; ++d) acc[d] += p * to_float(v, d);
}

// KT: the cache's element type, T's or int8 (then each cached key and value row has its own scale,
// k_scale and v_scale [R, H, L]: a key's score and a value's weight are multiplied by them).
template <typename T, typename KT>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           const torch::Tensor& k_scale, const torch::Tensor& v_scale,
                           const int64_t* rows, const int64_t* lengths, torch::Tensor& out, float scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), L = k.size(2);
  const T* qp = q.data_ptr<T>();
  const KT* kp = k.data_ptr<KT>();
  const KT* vp = v.data_ptr<KT>();
  constexpr bool scaled = std::is_same<KT, int8_t>::value;
  const float* ksp = scaled ? k_scale.data_ptr<float>() : nullptr;
  const float* vsp = scaled ? v_scale.data_ptr<float>() : nullptr;
  T* op = out.data_ptr<T>();
  // Each task reads at least ~64 K elements of cache, so tiny models stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(2 * L * D, 1));
  parallel_rows(B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> query(D), acc(D), scores(L + 8);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t row = rows ? rows[b] : b, length = lengths ? lengths[b] : L;
      const T* qrow = qp + b * q.stride(0) + h * q.stride(1);
      for (int64_t d = 0; d < D; ++d) query[d] = to_float(qrow, d) * scale;
      const KT* keys = kp + row * k.stride(0) + h * k.stride(1);
      const KT* values = vp + row * v.stride(0) + h * v.stride(1);
      const float* key_scales = scaled ? ksp + row * k_scale.stride(0) + h * k_scale.stride(1) : nullptr;
      const float* value_scales = scaled ? vsp + row * v_scale.stride(0) + h * v_scale.stride(1) : nullptr;
      float highest = -INFINITY, total = 0.f;
      int64_t j = 0;
      prefetch_start(keys, length * k.stride(2) * int64_t(sizeof(KT)));
#if SC_AVX2
      __m256 top = _mm256_set1_ps(-INFINITY);
      for (; j + 8 <= length; j += 8) {
        prefetch_span_ahead(keys + j * k.stride(2), 8 * k.stride(2) * sizeof(KT));
        __m256 s = dot_rows8(query.data(), keys + j * k.stride(2), k.stride(2), D);
        if (scaled) s = _mm256_mul_ps(s, _mm256_loadu_ps(key_scales + j));
        _mm256_storeu_ps(scores.data() + j, s);
        top = _mm256_max_ps(top, s);
      }
      alignas(32) float tops[8];
      _mm256_store_ps(tops, top);
      for (float t : tops) highest = std::max(highest, t);
#endif
      for (; j < length; ++j) {
        scores[j] = dot_row(query.data(), keys + j * k.stride(2), D);
        if (scaled) scores[j] *= key_scales[j];
        highest = std::max(highest, scores[j]);
      }
      j = 0;
      prefetch_start(values, length * v.stride(2) * int64_t(sizeof(KT)));  // in flight during the softmax
#if SC_AVX2
      const __m256 top8 = _mm256_set1_ps(highest);
      __m256 sum8 = _mm256_setzero_ps();
      for (; j + 8 <= length; j += 8) {
        const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores.data() + j), top8));
        _mm256_storeu_ps(scores.data() + j, e);
        sum8 = _mm256_add_ps(sum8, e);
      }
      total = hsum(sum8);
#endif
      for (; j < length; ++j) total += (scores[j] = std::exp(scores[j] - highest));
      if (scaled) {  // the normalisation keeps the unscaled weights; each value row carries its scale
        for (int64_t i = 0; i < length; ++i) scores[i] *= value_scales[i];
      }
      bool done = false;
#if SC_AVX2
      const int64_t vs = v.stride(2);
      switch (D) {  // the head sizes of the family's shapes keep their sums in registers
        case 32: weighted_values<4>(scores.data(), values, vs, length, acc.data()); done = true; break;
        case 64: weighted_values<8>(scores.data(), values, vs, length, acc.data()); done = true; break;
        case 80: weighted_values<10>(scores.data(), values, vs, length, acc.data()); done = true; break;
        case 96: weighted_values<12>(scores.data(), values, vs, length, acc.data()); done = true; break;
        default: break;
      }
#endif
      if (!done) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t i = 0; i < length; ++i) add_scaled_row(acc.data(), values + i * v.stride(2), scores[i], D);
      }
      const float inverse = 1.0f / total;  // the softmax's normalisation, once per output, not per key
      for (int64_t d = 0; d < D; ++d) store(op, bh * D + d, acc[d] * inverse);
    }
  });
}

// ---- prompt GEMM on AVX2 (the Zen 1-3 machines) ------------------------------------------------
// Activations quantized per row as everywhere (so a row's sums are the exact integers the VNNI and
// AMX GEMMs compute, and the outputs the same bits). One register holds 8 activation rows × 4
// consecutive inputs; 4 weights of one output channel are broadcast against it. vpmaddubsw needs
// one unsigned operand, and x + 128 against w would overflow its int16 pair sums, so it multiplies
// |x| by w with x's sign (≤ 2 · 127 · 127, no saturation), and vpmaddwd by ones sums the pairs into
// int32. That uses both of the multiply pipes; vpmaddwd alone on int16 runs on one of them and
// reached half this speed. Activations go in chunks of 64 rows, so a chunk stays in L2 while every
// weight block passes over it.
#if SC_AVX2
constexpr int kAvx2WeightRows = 4;    // 2 × 4 accumulators, 4 activation registers, weight, ones: 15 of 16
constexpr int64_t kAvx2ChunkRows = 64;

// x → int8 blocks of 8 rows, [block][K / 4][8 rows][4], zero rows past M, as signed values and as
// magnitudes, and each row's scale.
template <typename T>
void pack_activations_avx2(const T* x, int64_t M, int64_t K, int8_t* q, uint8_t* magnitude, float* scale) {
  const int64_t blocks = (M + 7) / 8;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk)
      for (int64_t r = 0; r < 8; ++r) {
        const int64_t m = blk * 8 + r;
        const int64_t base = blk * K * 8 + r * 4;
        float amax = 0.f;
        if (m < M)
          for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(to_float(x, m * K + k)));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int64_t k = 0; k < K; ++k) {
          const int32_t v = m < M ? std::clamp(static_cast<int32_t>(std::nearbyint(to_float(x, m * K + k) * inv)), -128, 127) : 0;
          q[base + (k / 4) * 32 + k % 4] = static_cast<int8_t>(v);
          magnitude[base + (k / 4) * 32 + k % 4] = static_cast<uint8_t>(std::abs(v));
        }
        if (m < M) scale[m] = amax / 127.f;
      }
  });
}

// RB blocks of 8 activation rows × NW weight rows (int8 [NW][K]), over all of K.
template <int NW, int RB, typename T>
void avx2_gemm_tile(const int8_t* w, const int8_t* xq, const uint8_t* xa, int64_t K, const float* sx,
                    const float* sw, const float* b, int64_t m0, int64_t n0, int64_t M, int64_t N, T* y) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[RB][NW];
  for (int r = 0; r < RB; ++r)
    for (int n = 0; n < NW; ++n) acc[r][n] = _mm256_setzero_si256();
  for (int64_t p = 0; p < K / 4; ++p) {
    __m256i xs[RB], xm[RB];
    for (int r = 0; r < RB; ++r) {
      xs[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (r * K / 4 + p) * 32));
      xm[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + (r * K / 4 + p) * 32));
    }
    for (int n = 0; n < NW; ++n) {
      int32_t four;
      std::memcpy(&four, w + n * K + 4 * p, 4);
      const __m256i wv = _mm256_set1_epi32(four);
      for (int r = 0; r < RB; ++r)
        acc[r][n] = _mm256_add_epi32(acc[r][n],
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(xm[r], _mm256_sign_epi8(wv, xs[r])), ones));
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int n = 0; n < NW; ++n) {
      alignas(32) int32_t sums[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums), acc[r][n]);
      for (int i = 0; i < 8; ++i) {
        const int64_t m = m0 + r * 8 + i;
        if (m < M) store(y, m * N + n0 + n, rescale(sums[i], sx[m], sw[n0 + n], b ? b[n0 + n] : 0.f));
      }
    }
}

template <int NW, typename T>
void avx2_weight_block(const int8_t* w, const int8_t* xq, const uint8_t* xa, int64_t blocks, int64_t K,
                       const float* sx, const float* sw, const float* b, int64_t m0, int64_t n0, int64_t M, int64_t N,
                       T* y) {
  int64_t blk = 0;
  for (; blk + 2 <= blocks; blk += 2)
    avx2_gemm_tile<NW, 2>(w, xq + blk * K * 8, xa + blk * K * 8, K, sx, sw, b, m0 + blk * 8, n0, M, N, y);
  if (blk < blocks) avx2_gemm_tile<NW, 1>(w, xq + blk * K * 8, xa + blk * K * 8, K, sx, sw, b, m0 + blk * 8, n0, M, N, y);
}

// y = x · (w · sw)ᵀ + b for int8 weights [N, K] given row by row: `weight_rows(n0, rows, int8_out)`
// fills `rows` weight rows starting at n0 (int4 weights are re-gridded to int8 there) and returns
// their scales through `sw` (indexed by output channel).
template <typename T, typename Rows>
void avx2_prompt_gemm(const torch::Tensor& x, int64_t N, const float* sw, const float* b, Rows&& weight_rows,
                      T* y) {
  const int64_t M = x.size(0), K = x.size(1), blocks = (M + 7) / 8;
  std::vector<int8_t> xq(blocks * 8 * K);
  std::vector<uint8_t> xa(blocks * 8 * K);
  std::vector<float> sx(blocks * 8);
  if (x.scalar_type() == torch::kBFloat16)
    pack_activations_avx2(x.data_ptr<c10::BFloat16>(), M, K, xq.data(), xa.data(), sx.data());
  else
    pack_activations_avx2(x.data_ptr<float>(), M, K, xq.data(), xa.data(), sx.data());
  const int64_t weight_blocks = (N + kAvx2WeightRows - 1) / kAvx2WeightRows;
  const int64_t chunk_blocks = kAvx2ChunkRows / 8;
  for (int64_t c0 = 0; c0 < blocks; c0 += chunk_blocks) {
    const int64_t chunk = std::min(chunk_blocks, blocks - c0);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      std::vector<int8_t> w8(kAvx2WeightRows * K);
      for (int64_t wb; (wb = next.fetch_add(1)) < weight_blocks;) {
        const int64_t n0 = wb * kAvx2WeightRows, rows = std::min<int64_t>(kAvx2WeightRows, N - n0);
        weight_rows(n0, rows, w8.data());
        const int8_t* q = xq.data() + c0 * 8 * K;
        const uint8_t* a = xa.data() + c0 * 8 * K;
        const int64_t m0 = c0 * 8;
        switch (rows) {
          case 4: avx2_weight_block<4>(w8.data(), q, a, chunk, K, sx.data(), sw, b, m0, n0, M, N, y); break;
          case 3: avx2_weight_block<3>(w8.data(), q, a, chunk, K, sx.data(), sw, b, m0, n0, M, N, y); break;
          case 2: avx2_weight_block<2>(w8.data(), q, a, chunk, K, sx.data(), sw, b, m0, n0, M, N, y); break;
          default: avx2_weight_block<1>(w8.data(), q, a, chunk, K, sx.data(), sw, b, m0, n0, M, N, y); break;
        }
      }
    });
  }
}
#endif

// int4 rows → int8 on one grid per output channel (c = its largest |w| / 127), as every prompt GEMM
// takes them: value v of a group is round(v · s / c + min / c), looked up from a 16-entry table per
// group, so the AMX, VNNI and AVX2 GEMMs multiply the same int8 weights.
// Only columns [k_begin, k_end) are written (the AMX loop converts one K slice at a time); the grid
// is always that of the whole row.
void int4_rows_to_int8(const uint8_t* w, const c10::Half* scale, const c10::Half* minimum, int64_t K,
                       int64_t group_size, int64_t rows, int8_t* out, float* c, int64_t k_begin = 0,
                       int64_t k_end = -1) {
  if (k_end < 0) k_end = K;
  const int64_t groups = K / group_size;
  for (int64_t r = 0; r < rows; ++r) {
    float bound = 0.f;  // the largest |w| the row can hold
    for (int64_t g = 0; g < groups; ++g) {
      const float lo = half_to_float(minimum + r * groups, g), hi = lo + 15.f * half_to_float(scale + r * groups, g);
      bound = std::max(bound, std::max(std::fabs(lo), std::fabs(hi)));
    }
    const float inv = bound > 0.f ? 127.f / bound : 0.f;
    c[r] = bound / 127.f;
    const uint8_t* row = w + r * (K / 2);
    for (int64_t g = k_begin / group_size; g * group_size < k_end; ++g) {
      alignas(16) int8_t table[16];
      const float step = half_to_float(scale + r * groups, g) * inv, base = half_to_float(minimum + r * groups, g) * inv;
      for (int v = 0; v < 16; ++v)
        table[v] = static_cast<int8_t>(std::clamp(static_cast<int32_t>(std::nearbyint(std::fma(float(v), step, base))), -128, 127));
      for (int64_t k = std::max(g * group_size, k_begin); k < std::min((g + 1) * group_size, k_end); k += kBlock) {
#if SC_AVX2
        const __m256i lookup = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(table)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * K + k), _mm256_shuffle_epi8(lookup, unpack_u4(row + k / 2)));
#else
        for (int64_t i = 0; i < kBlock / 2; ++i) {
          const uint8_t byte = row[k / 2 + i];
          out[r * K + k + i] = table[byte & 0x0F];
          out[r * K + k + i + kBlock / 2] = table[byte >> 4];
        }
#endif
      }
    }
  }
}

// The bias as fp32 for the kernels' epilogues. A bf16 bias is widened here, in one loop, rather than
// by a `.to()` per call: that costs a tensor allocation and an operator dispatch on every linear.
class FloatBias {
 public:
  explicit FloatBias(const c10::optional<torch::Tensor>& bias) {
    if (!bias.has_value() || !bias->defined()) return;
    if (bias->scalar_type() == torch::kFloat32 && bias->is_contiguous()) {
      borrowed_ = bias->data_ptr<float>();
    } else if (bias->scalar_type() == torch::kBFloat16 && bias->is_contiguous()) {
      const c10::BFloat16* b = bias->data_ptr<c10::BFloat16>();
      widened_.assign(b, b + bias->numel());
    } else {
      const torch::Tensor b = bias->to(torch::kFloat32).contiguous();
      widened_.assign(b.data_ptr<float>(), b.data_ptr<float>() + b.numel());
    }
  }
  const float* data() const { return borrowed_ ? borrowed_ : (widened_.empty() ? nullptr : widened_.data()); }

 private:
  const float* borrowed_ = nullptr;
  std::vector<float> widened_;
};

// ---- entry points -----------------------------------------------------------------------------

void check_common(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                  int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "x must be float32 or bfloat16");
  TORCH_CHECK(weight.is_contiguous() && weight.size(0) == n, "weight has the wrong shape or layout");
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n && bias->is_contiguous(), "bias has the wrong shape");
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 || bias->scalar_type() == torch::kBFloat16,
                "bias must be float32 or bfloat16");
  }
}

// isa: "" picks the best this CPU has; "avx2" or "avx512-vnni" ask for one (tests compare them).
// row_sums: int32 [N], each weight row's sum (the VNNI loops multiply x + 128, and take 128 x it off).
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                          const torch::Tensor& row_sums, const c10::optional<torch::Tensor>& bias,
                          const std::string& isa) {
  check_common(x, weight, bias, weight.size(0));
  TORCH_CHECK(weight.scalar_type() == torch::kInt8 && weight.size(1) == x.size(1), "weight must be int8 [N, K]");
  TORCH_CHECK(x.size(1) % kBlock == 0, "K must be a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == weight.size(0), "scale must be fp32 [N]");
  TORCH_CHECK(row_sums.scalar_type() == torch::kInt32 && row_sums.numel() == weight.size(0) && row_sums.is_contiguous(),
              "row_sums must be int32 [N] (the weight rows' sums)");
  TORCH_CHECK(isa.empty() || isa == "avx2" || isa == "avx512-vnni", "isa must be '', 'avx2' or 'avx512-vnni'");
  TORCH_CHECK(isa != "avx512-vnni" || vnni_available(), "this CPU cannot run the avx512-vnni kernel");
  const bool vnni = isa.empty() ? vnni_available() : isa == "avx512-vnni";
  const RowQuantized a = quantize_rows(x);
  torch::Tensor out = torch::empty({x.size(0), weight.size(0)}, x.options());
  const FloatBias b(bias);
  const float* bp = b.data();
  if (x.scalar_type() == torch::kBFloat16) int8_linear_impl<c10::BFloat16>(a, weight, scale, row_sums, bp, vnni, out);
  else int8_linear_impl<float>(a, weight, scale, row_sums, bp, vnni, out);
  return out;
}

torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                          const torch::Tensor& minimum, int64_t group_size, const c10::optional<torch::Tensor>& bias,
                          const std::string& isa) {
  check_common(x, weight, bias, weight.size(0));
  const int64_t K = x.size(1);
  TORCH_CHECK(group_size % kBlock == 0 && K % group_size == 0, "group size must be a multiple of 32 dividing K");
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.size(1) * 2 == K, "weight must be uint8 [N, K/2]");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && minimum.scalar_type() == torch::kHalf &&
                  scale.is_contiguous() && minimum.is_contiguous() &&
                  scale.numel() == weight.size(0) * (K / group_size) && minimum.numel() == scale.numel(),
              "scale and min must be fp16 [N, K / group_size]");
  TORCH_CHECK(isa.empty() || isa == "avx2" || isa == "avx512-vnni", "isa must be '', 'avx2' or 'avx512-vnni'");
  TORCH_CHECK(isa != "avx512-vnni" || vnni_available(), "this CPU cannot run the avx512-vnni kernel");
  const bool vnni = isa.empty() ? vnni_available() : isa == "avx512-vnni";
  const RowQuantized a = quantize_rows(x);
  torch::Tensor out = torch::empty({x.size(0), weight.size(0)}, x.options());
  const FloatBias b(bias);
  const float* bp = b.data();
  if (x.scalar_type() == torch::kBFloat16) int4_linear_impl<c10::BFloat16>(a, weight, scale, minimum, group_size, bp, vnni, out);
  else int4_linear_impl<float>(a, weight, scale, minimum, group_size, bp, vnni, out);
  return out;
}

#if SC_AMX_BUILD
bool bf16_dot_available();
template <typename T>
void bf16_linear_dpbf16(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                        torch::Tensor& out);
#endif

inline bool bf16_kernel_available() {  // vdpbf16ps: the bf16 linear and the prefill attention
#if SC_AMX_BUILD
  return bf16_dot_available();
#else
  return false;
#endif
}

// isa "avx512-bf16" (vdpbf16ps: bf16 activations only) or "avx2" (weights widened to fp32); by
// default the first this CPU and the activations' dtype allow.
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& weight,
                          const c10::optional<torch::Tensor>& bias, const std::string& isa) {
  check_common(x, weight, bias, weight.size(0));
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16 && weight.size(1) == x.size(1), "weight must be bf16 [N, K]");
  TORCH_CHECK(isa.empty() || isa == "avx2" || isa == "avx512-bf16", "isa must be '', 'avx2' or 'avx512-bf16'");
  TORCH_CHECK(isa != "avx512-bf16" || (bf16_kernel_available() && x.scalar_type() == torch::kBFloat16),
              "the avx512-bf16 kernel needs AVX512-BF16 and bf16 activations");
  torch::Tensor out = torch::empty({x.size(0), weight.size(0)}, x.options());
  const torch::Tensor b = bias.has_value() ? *bias : torch::Tensor();
#if SC_AMX_BUILD
  if (x.scalar_type() == torch::kBFloat16 && bf16_kernel_available() && isa != "avx2") {
    bf16_linear_dpbf16<c10::BFloat16>(x, weight, b, out);
    return out;
  }
#endif
  if (x.scalar_type() == torch::kBFloat16) bf16_linear_impl<c10::BFloat16>(x, weight, b, out);
  else bf16_linear_impl<float>(x, weight, b, out);
  return out;
}

// q [B, H, 1, D]; k, v [R, H, L, D] (any strides with a contiguous last dim); softmax(q k^T / sqrt(D)) v.
// Row b of q reads cache row rows[b] (default b) and its first lengths[b] keys (default all L), so a
// batch of sequences at different positions attends straight from the shared cache, without a copy.
// An int8 cache (k and v int8) comes with k_scale and v_scale: float32 [R, H, L], one per key and value.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const c10::optional<torch::Tensor>& rows, const c10::optional<torch::Tensor>& lengths,
                               const c10::optional<torch::Tensor>& k_scale, const c10::optional<torch::Tensor>& v_scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "q must be [B, H, 1, D], k and v [R, H, L, D]");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == q.size(1) && k.size(3) == q.size(3) &&
              (rows.has_value() || k.size(0) == q.size(0)), "q, k and v shapes disagree");
  const int64_t B = q.size(0), R = k.size(0), L = k.size(2);
  for (const auto* index : {&rows, &lengths}) {
    TORCH_CHECK(!index->has_value() || ((*index)->scalar_type() == torch::kInt64 && (*index)->is_contiguous() &&
                                        (*index)->numel() == B), "rows and lengths must be contiguous int64 [B]");
  }
  const int64_t* row_ptr = rows.has_value() ? rows->data_ptr<int64_t>() : nullptr;
  const int64_t* length_ptr = lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(!row_ptr || (row_ptr[b] >= 0 && row_ptr[b] < R), "cache row out of range");
    TORCH_CHECK(!length_ptr || (length_ptr[b] >= 1 && length_ptr[b] <= L), "key length out of range");
  }
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16, "q must be float32 or bfloat16");
  const bool int8_cache = k.scalar_type() == torch::kInt8;
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (int8_cache || k.scalar_type() == q.scalar_type()),
              "k and v must have q's dtype, or be int8 with scales");
  TORCH_CHECK(int8_cache == (k_scale.has_value() && v_scale.has_value()), "k_scale and v_scale go with an int8 cache");
  if (int8_cache) {
    for (const auto* s : {&k_scale, &v_scale}) {
      TORCH_CHECK((*s)->scalar_type() == torch::kFloat32 && (*s)->dim() == 3 && (*s)->size(0) == R &&
                  (*s)->size(1) == k.size(1) && (*s)->size(2) == L && (*s)->stride(2) == 1,
                  "k_scale and v_scale must be float32 [R, H, L] with contiguous slots");
    }
  }
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && q.device().is_cpu() && k.device().is_cpu(),
              "the head dimension must be contiguous, on the CPU");
  torch::Tensor out = torch::empty({q.size(0), q.size(1), 1, q.size(3)}, q.options());
  const float scale = 1.0f / std::sqrt(static_cast<float>(q.size(3)));
  const torch::Tensor none;
  const torch::Tensor& ks = int8_cache ? *k_scale : none;
  const torch::Tensor& vs = int8_cache ? *v_scale : none;
  if (q.scalar_type() == torch::kBFloat16) {
    if (int8_cache) decode_attention_impl<c10::BFloat16, int8_t>(q, k, v, ks, vs, row_ptr, length_ptr, out, scale);
    else decode_attention_impl<c10::BFloat16, c10::BFloat16>(q, k, v, ks, vs, row_ptr, length_ptr, out, scale);
  } else {
    if (int8_cache) decode_attention_impl<float, int8_t>(q, k, v, ks, vs, row_ptr, length_ptr, out, scale);
    else decode_attention_impl<float, float>(q, k, v, ks, vs, row_ptr, length_ptr, out, scale);
  }
  return out;
}

// Writes one layer's new keys or values x [B, H, T, D] (contiguous rows of D) into the cache's slots:
// row i of x (in [B, H, T] order) goes to flat slot slots[i] of cache [R, H, S, D]. An int8 cache
// (with scales [R, H, S]) gets each row quantized as activations are (quantize_row; in PyTorch:
// ops.quantize_rows). One call where index_copy_
// took ~19 us a call for a decode step's 32 x 80 values (and an int8 cache needs four of them).
void store_kv(torch::Tensor& cache, const c10::optional<torch::Tensor>& scales, const torch::Tensor& slots,
              const torch::Tensor& x) {
  TORCH_CHECK(cache.dim() == 4 && cache.is_contiguous() && x.dim() == 4 && x.size(3) == cache.size(3) &&
              x.size(1) == cache.size(1) && x.stride(3) == 1 && cache.device().is_cpu() && x.device().is_cpu(),
              "cache must be contiguous [R, H, S, D] and x [B, H, T, D] with contiguous rows, on the CPU");
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), D = x.size(3), count = cache.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.numel() == B * H * T_,
              "slots must be contiguous int64, one per row of x");
  const bool int8_cache = cache.scalar_type() == torch::kInt8;
  TORCH_CHECK(int8_cache == scales.has_value(), "scales go with an int8 cache, and only with one");
  TORCH_CHECK(int8_cache || cache.scalar_type() == x.scalar_type(), "x must have the cache's dtype");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "x must be fp32 or bf16");
  if (int8_cache) {
    TORCH_CHECK(scales->scalar_type() == torch::kFloat32 && scales->is_contiguous() && scales->numel() == count,
                "scales must be contiguous float32 [R, H, S]");
  }
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * H * T_; ++i) TORCH_CHECK(slot[i] >= 0 && slot[i] < count, "cache slot out of range");
  const auto row_of = [&](int64_t i) {  // x's row i in [B, H, T] order
    const int64_t b = i / (H * T_), h = (i / T_) % H, t = i % T_;
    return static_cast<const char*>(x.data_ptr()) + (b * x.stride(0) + h * x.stride(1) + t * x.stride(2)) * x.element_size();
  };
  for (int64_t i = 0; i < B * H * T_; ++i) {
    if (!int8_cache) {
      std::memcpy(static_cast<char*>(cache.data_ptr()) + slot[i] * D * x.element_size(), row_of(i), D * x.element_size());
    } else if (x.scalar_type() == torch::kBFloat16) {
      quantize_row(reinterpret_cast<const c10::BFloat16*>(row_of(i)), D, cache.data_ptr<int8_t>() + slot[i] * D, nullptr,
                   scales->data_ptr<float>() + slot[i]);
    } else {
      quantize_row(reinterpret_cast<const float*>(row_of(i)), D, cache.data_ptr<int8_t>() + slot[i] * D, nullptr,
                   scales->data_ptr<float>() + slot[i]);
    }
  }
}


// ---- attention of a prompt over the KV cache (bf16, AVX512-BF16) ---------------------------------
// Queries at positions start .. start+T-1 attend causally to keys 0 .. start+T-1 (the cache filled
// from slot 0), flash-style: key blocks of 64 with an online softmax, so no [T, L] scores exist.
// Q·Kᵀ runs on vdpbf16ps (bf16 pairs, exact products, fp32 sums), K first regrouped per head into
// 16-key groups of dimension pairs; P·V multiplies fp32 probabilities with V widened to fp32.
#if SC_AMX_BUILD
#define SC_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

bool bf16_dot_available() {
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    const bool bf16 = a & (1u << 5);
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return bf16 && (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 17)) && (b & (1u << 31));
  }();
  return ready;
}

SC_BF16 inline __m512 dpbf16(__m512 acc, __m512i a, __m512i b) {
  __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// bf16 weights times bf16 activations on vdpbf16ps: 32 products per instruction straight from the
// weights as stored (no widening to fp32), and activations kept in bf16, so a K = 10240 row of the
// MLP's down projection (20 KB) stays in L1 where its fp32 copy (40 KB) would not. Products of two
// bf16 values are exact in fp32; the sums run in fp32 as in bf16_row.
template <int ROWS, typename T>
SC_BF16 void bf16_rows_dpbf16(const uint16_t* w, const uint16_t* x, const float* bias, int64_t K, int64_t N,
                              int64_t n, int64_t m0, T* y) {
  __m512 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint16_t* row = w + n * K;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {  // two accumulators per row: consecutive steps do not wait on each other
    prefetch_ahead(row + k);
    prefetch_ahead(row + k + 32);
    const __m512i w0 = _mm512_loadu_si512(row + k), w1 = _mm512_loadu_si512(row + k + 32);
    for (int r = 0; r < ROWS; ++r) {
      acc[r][0] = dpbf16(acc[r][0], w0, _mm512_loadu_si512(x + r * K + k));
      acc[r][1] = dpbf16(acc[r][1], w1, _mm512_loadu_si512(x + r * K + k + 32));
    }
  }
  for (; k < K; k += 32) {  // the rest, zero-filled past K
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    const __m512i w0 = _mm512_maskz_loadu_epi16(mask, row + k);
    for (int r = 0; r < ROWS; ++r) acc[r][0] = dpbf16(acc[r][0], w0, _mm512_maskz_loadu_epi16(mask, x + r * K + k));
  }
  for (int r = 0; r < ROWS; ++r)
    store(y, (m0 + r) * N + n, _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) + (bias ? bias[n] : 0.f));
}

template <typename T>
void bf16_linear_dpbf16(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                        torch::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const torch::Tensor xc = x.contiguous();
  const FloatBias b(bias);  // an undefined tensor: no bias
  const float* bp = b.data();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
  T* y = out.data_ptr<T>();
  parallel_rows(N, grain_rows(2 * K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile)
        dispatch_rows<kRowTile>(M - m0, [&](auto rows) {
          bf16_rows_dpbf16<rows()>(w, xp + m0 * K, bp, K, N, n, m0, y);
        });
  });
}
#endif

#if SC_AMX_BUILD
// e^x for x <= 0 on 16 lanes, for both attention kernels below: the decode kernel's polynomial
// (exp8_nonpositive) on the full width, with vscalefps for the 2^n.
SC_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

constexpr int kKeyBlock = 64;   // keys per softmax step: 4 vectors of 16 scores
constexpr int kQueryRows = 4;   // query rows sharing each load of K and V
constexpr int kMaxHeadDim = 256;

// One (row, head): queries q [T, D], keys and values [L, D] (L = start + T), out [T, D].
template <int DV>  // D / 16 vectors per value row
SC_BF16 void prefill_attention_head(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                                    int64_t T, int64_t start, int64_t D, int64_t q_stride, int64_t k_stride,
                                    int64_t v_stride, uint32_t* kp, uint32_t* vp, float scale) {
  const int64_t out_stride = D;
  const int64_t L = start + T, groups = (L + 15) / 16, pairs = D / 2;
  // V as [key pair][dimension]: one load gives 16 dimensions of two consecutive keys, the layout
  // vdpbf16ps multiplies by a broadcast pair of probabilities. A missing last key is zero.
  for (int64_t j2 = 0; j2 < (L + 1) / 2; ++j2) {
    const uint16_t* first = v + 2 * j2 * v_stride;
    const uint16_t* second = 2 * j2 + 1 < L ? first + v_stride : nullptr;
    for (int d = 0; d < DV; ++d) {
      const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + 16 * d)));
      const __m512i b = second ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + 16 * d)))
                               : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + j2 * D + 16 * d, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
  // K as [group of 16 keys][dimension pair][key]: one load gives a dimension pair of 16 keys.
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t key = g * 16 + j;
      const uint32_t* row = reinterpret_cast<const uint32_t*>(k + std::min(key, L - 1) * k_stride);
      for (int64_t d2 = 0; d2 < pairs; ++d2) kp[(g * pairs + d2) * 16 + j] = key < L ? row[d2] : 0;
    }
  const __m512 lane = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t t0 = 0; t0 < T; t0 += kQueryRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kQueryRows, T - t0));
    float m[kQueryRows];
    __m512 l[kQueryRows];  // per-lane sums of the probabilities, added up at the end
    __m512 acc[kQueryRows][DV];
    for (int r = 0; r < kQueryRows; ++r) {
      m[r] = -INFINITY;
      l[r] = _mm512_setzero_ps();
      for (int d = 0; d < DV; ++d) acc[r][d] = _mm512_setzero_ps();
    }
    const int64_t last_key = start + t0 + rows - 1;  // the last query sees keys 0 .. last_key
    for (int64_t kb = 0; kb <= last_key; kb += kKeyBlock) {
      __m512 s[kQueryRows][4];
      for (int r = 0; r < kQueryRows; ++r)
        for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
      const int64_t g0 = kb / 16, blocks = std::min<int64_t>(4, groups - g0);
      for (int64_t d2 = 0; d2 < pairs; ++d2) {
        __m512i kv[4];
        for (int c = 0; c < 4; ++c)
          kv[c] = c < blocks ? _mm512_loadu_si512(kp + ((g0 + c) * pairs + d2) * 16) : _mm512_setzero_si512();
        for (int r = 0; r < kQueryRows; ++r) {
          if (r >= rows) break;
          uint32_t word;
          std::memcpy(&word, q + (t0 + r) * q_stride + 2 * d2, 4);
          const __m512i qv = _mm512_set1_epi32(static_cast<int>(word));
          for (int c = 0; c < 4; ++c) s[r][c] = dpbf16(s[r][c], kv[c], qv);
        }
      }
      alignas(64) uint32_t probs[kQueryRows][kKeyBlock / 2];
      // Only blocks that reach past the first query's position hide keys (causally, or past L).
      const bool diagonal = kb + kKeyBlock - 1 > start + t0;
      for (int r = 0; r < rows; ++r) {
        const float limit = static_cast<float>(start + t0 + r);  // keys past the query's position are hidden
        __m512 best = _mm512_set1_ps(-INFINITY);
        __mmask16 visible[4] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
        for (int c = 0; c < 4; ++c) {
          if (diagonal) {
            const __m512 key = _mm512_add_ps(lane, _mm512_set1_ps(static_cast<float>(kb + 16 * c)));
            visible[c] = _mm512_cmp_ps_mask(key, _mm512_set1_ps(limit), _CMP_LE_OQ);
          }
          best = _mm512_mask_max_ps(best, visible[c], best, s[r][c]);
        }
        // m is kept in scaled units: the scale folds into the exponent's subtraction.
        const float m_new = std::max(m[r], scale * _mm512_reduce_max_ps(best));
        if (m_new > m[r]) {  // a new maximum: rescale what was summed so far
          const float correction = std::exp(m[r] - m_new);
          l[r] = _mm512_mul_ps(l[r], _mm512_set1_ps(correction));
          for (int d = 0; d < DV; ++d) acc[r][d] = _mm512_mul_ps(acc[r][d], _mm512_set1_ps(correction));
          m[r] = m_new;
        }
        __m512 p[4];
        for (int c = 0; c < 4; ++c) {
          const __m512 e = exp_nonpositive(_mm512_fmsub_ps(s[r][c], _mm512_set1_ps(scale), _mm512_set1_ps(m_new)));
          p[c] = diagonal ? _mm512_maskz_mov_ps(visible[c], e) : e;
          l[r] = _mm512_add_ps(l[r], p[c]);
        }
        // bf16 pairs of consecutive keys' probabilities: word j holds keys 2j and 2j + 1.
        _mm512_store_si512(probs[r], (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]));
        _mm512_store_si512(probs[r] + 16, (__m512i)_mm512_cvtne2ps_pbh(p[3], p[2]));
      }
      // P·V on vdpbf16ps, two keys per product. The probabilities are rounded to bf16 here (as
      // SDPA's AMX path does); their sum l stays the fp32 one.
      const int64_t keys = std::min<int64_t>(kKeyBlock, std::min(L, last_key + 1) - kb);
      for (int64_t j2 = 0; j2 < (keys + 1) / 2; ++j2) {
        __m512i vv[DV];
        const uint32_t* pair = vp + (kb / 2 + j2) * D;
        for (int d = 0; d < DV; ++d) vv[d] = _mm512_loadu_si512(pair + 16 * d);
        for (int r = 0; r < kQueryRows; ++r) {
          if (r >= rows) break;
          const __m512i pr = _mm512_set1_epi32(static_cast<int>(probs[r][j2]));
          for (int d = 0; d < DV; ++d) acc[r][d] = dpbf16(acc[r][d], vv[d], pr);
        }
      }
    }
    for (int r = 0; r < rows; ++r) {
      const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(l[r]));
      for (int d = 0; d < DV; ++d) {
        const __m256i bf = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][d], inv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (t0 + r) * out_stride + 16 * d), bf);
      }
    }
  }
}
#endif

// q [B, H, T, D], k and v [R >= B, H, S >= start + T, D] bf16: the first B cache rows, keys from slot 0.
torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t start) {
#if SC_AMX_BUILD
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k.scalar_type() == torch::kBFloat16 &&
              v.scalar_type() == torch::kBFloat16, "prefill attention takes bf16 q, k, v");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) >= B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(), "k, v shapes do not match q");
  TORCH_CHECK(start >= 0 && start + T <= k.size(2), "the keys must hold slots 0 .. start + T - 1");
  TORCH_CHECK(D % 16 == 0 && D <= kMaxHeadDim, "head dim must be a multiple of 16, at most 256");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the last dimension must be contiguous");
  TORCH_CHECK(bf16_dot_available(), "prefill attention needs AVX512-BF16");
  torch::Tensor out = torch::empty({B, H, T, D}, q.options());
  const int64_t L = start + T, groups = (L + 15) / 16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> kbuf(groups * 16 * (D / 2)), vbuf((L + 1) / 2 * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const uint16_t* qh = qp + b * q.stride(0) + h * q.stride(1);
      const uint16_t* kh = kp + b * k.stride(0) + h * k.stride(1);
      const uint16_t* vh = vp + b * v.stride(0) + h * v.stride(1);
      uint16_t* oh = op + (b * H + h) * T * D;
      switch (D / 16) {
#define SC_HEAD(N) case N: prefill_attention_head<N>(qh, kh, vh, oh, T, start, D, q.stride(2), k.stride(2), v.stride(2), kbuf.data(), vbuf.data(), scale); break;
        SC_HEAD(1) SC_HEAD(2) SC_HEAD(3) SC_HEAD(4) SC_HEAD(5) SC_HEAD(6) SC_HEAD(7) SC_HEAD(8)
        SC_HEAD(9) SC_HEAD(10) SC_HEAD(11) SC_HEAD(12) SC_HEAD(13) SC_HEAD(14) SC_HEAD(15) SC_HEAD(16)
#undef SC_HEAD
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "prefill attention needs an x86-64 build with AVX512-BF16");
  return q;
#endif
}

// ---- causal self-attention for training: forward with its log-sum-exp, and backward -------------
// SDPA's CPU flash kernel runs small heads (the embedded model's 32 dims) far below the FMA rate and
// decides the training step. Here one (batch, head) is one task: its q, k, v (and out, grad_out) are
// staged once as fp32 rows [T, D], keys and values also as columns [D, Tp] (Tp: T rounded up to the
// block), so that every product is C[i, :] += a(i, k) · B[k, :] over 16-float vectors. Blocks of
// 64 queries × 64 keys with an online softmax; the backward recomputes each block's probabilities
// from the saved log-sum-exp (FlashAttention-2's scheme), so no [T, T] matrix is ever held.
#if SC_AMX_BUILD
bool avx512_available() {
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 17)) && (b & (1u << 31));  // F BW DQ VL
  }();
  return ready;
}

constexpr int64_t kAttnBlock = 64;

// C[r, :] += Σ_k A(r, k) · B[k, :] for R rows, B's rows 16·NV floats, A(r, k) = a[r·a_row + k·a_col].
template <int NV, int R>
SC_AVX512 inline void gemm_rows(float* c, int64_t ldc, const float* a, int64_t a_row, int64_t a_col,
                                const float* b, int64_t ldb, int64_t K) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(c + r * ldc + 16 * v);
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * a_row + k * a_col]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

// C [M, 16·NV] += A [M, K] · B [K, 16·NV], with as many rows per pass as 32 registers hold.
template <int NV>
SC_AVX512 void gemm_acc(float* c, int64_t ldc, const float* a, int64_t a_row, int64_t a_col, const float* b,
                        int64_t ldb, int64_t M, int64_t K) {
  constexpr int R = NV <= 2 ? 8 : NV <= 5 ? 4 : NV <= 10 ? 2 : 1;
  int64_t i = 0;
  for (; i + R <= M; i += R) gemm_rows<NV, R>(c + i * ldc, ldc, a + i * a_row, a_row, a_col, b, ldb, K);
  for (; i < M; ++i) gemm_rows<NV, 1>(c + i * ldc, ldc, a + i * a_row, a_row, a_col, b, ldb, K);
}

// One head's [T, D] rows (row stride `stride`) as fp32 rows [rows >= T, D], rows past T zero.
template <typename S>
void stage_rows(const S* src, int64_t stride, int64_t T, int64_t D, int64_t rows, float* dst) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t d = 0; d < D; ++d) dst[t * D + d] = t < T ? static_cast<float>(src[t * stride + d]) : 0.f;
}

// The same as fp32 columns [D, Tp], columns past T zero.
template <typename S>
void stage_columns(const S* src, int64_t stride, int64_t T, int64_t D, int64_t Tp, float* dst) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t t = 0; t < Tp; ++t) dst[d * Tp + t] = t < T ? static_cast<float>(src[t * stride + d]) : 0.f;
}

// Scores of a block (M queries from i0, 64 keys from j0, row stride 64) → probabilities in place:
// exp(score · scale − base[row]) for keys up to the row's own position, 0 past it. With `ds`, also
// ds = p · (dp − delta[row]) · scale in place of dp (the backward's gradient of the scores).
SC_AVX512 inline void block_probabilities(float* s, int64_t M, int64_t i0, int64_t j0, float scale,
                                          const float* base, float* ds, const float* delta) {
  const __m512 lane = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r = 0; r < M; ++r) {
    const float limit = static_cast<float>(i0 + r - j0);  // the last visible key, relative to j0
    const __m512 b = _mm512_set1_ps(base[r]);
    for (int c = 0; c < kAttnBlock / 16; ++c) {
      const __mmask16 visible = _mm512_cmp_ps_mask(_mm512_add_ps(lane, _mm512_set1_ps(16.f * c)),
                                                   _mm512_set1_ps(limit), _CMP_LE_OQ);
      float* row = s + r * kAttnBlock + 16 * c;
      const __m512 p = _mm512_maskz_mov_ps(
          visible, exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(row), _mm512_set1_ps(scale), b)));
      _mm512_storeu_ps(row, p);
      if (ds) {
        float* g = ds + r * kAttnBlock + 16 * c;
        const __m512 dp = _mm512_sub_ps(_mm512_loadu_ps(g), _mm512_set1_ps(delta[r]));
        _mm512_storeu_ps(g, _mm512_mul_ps(_mm512_mul_ps(p, dp), _mm512_set1_ps(scale)));
      }
    }
  }
}

// Forward of one head: q, kᵀ, v staged; out [T, D] fp32, lse [T].
template <int NV>
SC_AVX512 void train_attention_head(const float* q, const float* kt, const float* v, int64_t T, int64_t Tp,
                                    float scale, float* out, float* lse, float* s) {
  constexpr int64_t D = 16 * NV;
  float m[kAttnBlock], l[kAttnBlock];
  for (int64_t i0 = 0; i0 < T; i0 += kAttnBlock) {
    const int64_t M = std::min(kAttnBlock, T - i0);
    float* o = out + i0 * D;
    std::fill(o, o + M * D, 0.f);
    std::fill(m, m + M, -INFINITY);
    std::fill(l, l + M, 0.f);
    for (int64_t j0 = 0; j0 <= i0; j0 += kAttnBlock) {
      std::fill(s, s + M * kAttnBlock, 0.f);
      gemm_acc<kAttnBlock / 16>(s, kAttnBlock, q + i0 * D, D, 1, kt + j0, Tp, M, D);
      for (int64_t r = 0; r < M; ++r) {  // the running maximum, and the rescale of what came before
        const int64_t visible = std::min(kAttnBlock, i0 + r - j0 + 1);
        __m512 best = _mm512_set1_ps(-INFINITY);
        for (int c = 0; c < kAttnBlock / 16; ++c) {
          const int64_t left = visible - 16 * c;
          const __mmask16 mask = left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
          best = _mm512_mask_max_ps(best, mask, best, _mm512_loadu_ps(s + r * kAttnBlock + 16 * c));
        }
        const float m_new = std::max(m[r], _mm512_reduce_max_ps(best) * scale);
        const float correction = std::exp(m[r] - m_new);
        m[r] = m_new;
        l[r] *= correction;
        for (int64_t d = 0; d < D; ++d) o[r * D + d] *= correction;
      }
      block_probabilities(s, M, i0, j0, scale, m, nullptr, nullptr);
      for (int64_t r = 0; r < M; ++r) {
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < kAttnBlock / 16; ++c) sum = _mm512_add_ps(sum, _mm512_loadu_ps(s + r * kAttnBlock + 16 * c));
        l[r] += _mm512_reduce_add_ps(sum);
      }
      gemm_acc<NV>(o, D, s, kAttnBlock, 1, v + j0 * D, D, M, kAttnBlock);
    }
    for (int64_t r = 0; r < M; ++r) {
      const float inv = 1.0f / l[r];
      for (int64_t d = 0; d < D; ++d) o[r * D + d] *= inv;
      lse[i0 + r] = m[r] + std::log(l[r]);
    }
  }
}

// Backward of one head: gradients of q, k, v (fp32, [T or Tp, D], zeroed by the caller).
template <int NV>
SC_AVX512 void train_attention_head_backward(const float* q, const float* k, const float* kt, const float* vt,
                                             const float* dout, const float* delta, const float* lse, int64_t T,
                                             int64_t Tp, float scale, float* dq, float* dk, float* dv, float* p,
                                             float* ds) {
  constexpr int64_t D = 16 * NV;
  for (int64_t i0 = 0; i0 < T; i0 += kAttnBlock) {
    const int64_t M = std::min(kAttnBlock, T - i0);
    for (int64_t j0 = 0; j0 <= i0; j0 += kAttnBlock) {
      std::fill(p, p + M * kAttnBlock, 0.f);
      std::fill(ds, ds + M * kAttnBlock, 0.f);
      gemm_acc<kAttnBlock / 16>(p, kAttnBlock, q + i0 * D, D, 1, kt + j0, Tp, M, D);      // scores
      gemm_acc<kAttnBlock / 16>(ds, kAttnBlock, dout + i0 * D, D, 1, vt + j0, Tp, M, D);  // dP = dO Vᵀ
      block_probabilities(p, M, i0, j0, scale, lse + i0, ds, delta + i0);
      gemm_acc<NV>(dv + j0 * D, D, p, 1, kAttnBlock, dout + i0 * D, D, kAttnBlock, M);   // dV += Pᵀ dO
      gemm_acc<NV>(dk + j0 * D, D, ds, 1, kAttnBlock, q + i0 * D, D, kAttnBlock, M);     // dK += dSᵀ Q
      gemm_acc<NV>(dq + i0 * D, D, ds, kAttnBlock, 1, k + j0 * D, D, M, kAttnBlock);     // dQ += dS K
    }
  }
}

#define SC_HEAD_DIMS(CALL) \
  CALL(1) CALL(2) CALL(3) CALL(4) CALL(5) CALL(6) CALL(7) CALL(8) CALL(9) CALL(10) CALL(11) CALL(12) \
  CALL(13) CALL(14) CALL(15) CALL(16)

void check_train_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v must be [B, H, T, D] alike");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
              (q.scalar_type() == torch::kFloat || q.scalar_type() == torch::kBFloat16), "q, k, v must be fp32 or bf16 alike");
  TORCH_CHECK(q.size(3) % 16 == 0 && q.size(3) <= kMaxHeadDim, "head dim must be a multiple of 16, at most 256");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the last dimension must be contiguous");
  TORCH_CHECK(avx512_available(), "the training attention kernel needs AVX-512");
}

// A head's [T, D] matrix in `t` for (batch, head) = (bh / H, bh % H).
template <typename S>
const S* head_of(const torch::Tensor& t, int64_t bh, int64_t H) {
  return reinterpret_cast<const S*>(t.data_ptr()) + (bh / H) * t.stride(0) + (bh % H) * t.stride(1);
}

template <typename S>
void write_head(const float* src, int64_t T, int64_t D, torch::Tensor& out, int64_t bh) {
  S* dst = reinterpret_cast<S*>(out.data_ptr()) + bh * T * D;
  for (int64_t i = 0; i < T * D; ++i) dst[i] = static_cast<S>(src[i]);
}

template <typename S>
std::pair<torch::Tensor, torch::Tensor> train_attention_typed(const torch::Tensor& q, const torch::Tensor& k,
                                                              const torch::Tensor& v) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Tp = (T + kAttnBlock - 1) / kAttnBlock * kAttnBlock;
  torch::Tensor out = torch::empty({B, H, T, D}, q.options());
  torch::Tensor lse = torch::empty({B, H, T}, q.options().dtype(torch::kFloat));
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(T * D), kt(D * Tp), vs(Tp * D), o(T * D), s(kAttnBlock * kAttnBlock);
    for (int64_t bh = begin; bh < end; ++bh) {
      stage_rows(head_of<S>(q, bh, H), q.stride(2), T, D, T, qs.data());
      stage_columns(head_of<S>(k, bh, H), k.stride(2), T, D, Tp, kt.data());
      stage_rows(head_of<S>(v, bh, H), v.stride(2), T, D, Tp, vs.data());
      float* lse_head = lse.data_ptr<float>() + bh * T;
      switch (D / 16) {
#define SC_CALL(N) case N: train_attention_head<N>(qs.data(), kt.data(), vs.data(), T, Tp, scale, o.data(), lse_head, s.data()); break;
        SC_HEAD_DIMS(SC_CALL)
#undef SC_CALL
      }
      write_head<S>(o.data(), T, D, out, bh);
    }
  });
  return {out, lse};
}

template <typename S>
std::vector<torch::Tensor> train_attention_backward_typed(const torch::Tensor& grad, const torch::Tensor& q,
                                                          const torch::Tensor& k, const torch::Tensor& v,
                                                          const torch::Tensor& out, const torch::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Tp = (T + kAttnBlock - 1) / kAttnBlock * kAttnBlock;
  torch::Tensor dq = torch::empty({B, H, T, D}, q.options()), dk = torch::empty_like(dq), dv = torch::empty_like(dq);
  const torch::Tensor lse_c = lse.contiguous();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(T * D), ks(Tp * D), kt(D * Tp), vt(D * Tp), dos(T * D), os(T * D), delta(T);
    std::vector<float> gq(T * D), gk(Tp * D), gv(Tp * D), p(kAttnBlock * kAttnBlock), ds(kAttnBlock * kAttnBlock);
    for (int64_t bh = begin; bh < end; ++bh) {
      stage_rows(head_of<S>(q, bh, H), q.stride(2), T, D, T, qs.data());
      stage_rows(head_of<S>(k, bh, H), k.stride(2), T, D, Tp, ks.data());
      stage_columns(head_of<S>(k, bh, H), k.stride(2), T, D, Tp, kt.data());
      stage_columns(head_of<S>(v, bh, H), v.stride(2), T, D, Tp, vt.data());
      stage_rows(head_of<S>(grad, bh, H), grad.stride(2), T, D, T, dos.data());
      stage_rows(head_of<S>(out, bh, H), out.stride(2), T, D, T, os.data());
      for (int64_t t = 0; t < T; ++t) {  // delta = rowsum(dO ∘ O)
        float sum = 0.f;
        for (int64_t d = 0; d < D; ++d) sum += dos[t * D + d] * os[t * D + d];
        delta[t] = sum;
      }
      std::fill(gq.begin(), gq.end(), 0.f);
      std::fill(gk.begin(), gk.end(), 0.f);
      std::fill(gv.begin(), gv.end(), 0.f);
      const float* lse_head = lse_c.data_ptr<float>() + bh * T;
      switch (D / 16) {
#define SC_CALL(N) case N: train_attention_head_backward<N>(qs.data(), ks.data(), kt.data(), vt.data(), dos.data(), \
    delta.data(), lse_head, T, Tp, scale, gq.data(), gk.data(), gv.data(), p.data(), ds.data()); break;
        SC_HEAD_DIMS(SC_CALL)
#undef SC_CALL
      }
      write_head<S>(gq.data(), T, D, dq, bh);
      write_head<S>(gk.data(), T, D, dk, bh);
      write_head<S>(gv.data(), T, D, dv, bh);
    }
  });
  return {dq, dk, dv};
}
#endif

// Causal softmax(q kᵀ / √D) v over q, k, v [B, H, T, D] (fp32 or bf16): (out, log-sum-exp [B, H, T] fp32).
std::pair<torch::Tensor, torch::Tensor> train_attention(const torch::Tensor& q, const torch::Tensor& k,
                                                        const torch::Tensor& v) {
#if SC_AMX_BUILD
  check_train_attention(q, k, v);
  return q.scalar_type() == torch::kBFloat16 ? train_attention_typed<c10::BFloat16>(q, k, v)
                                             : train_attention_typed<float>(q, k, v);
#else
  TORCH_CHECK(false, "the training attention kernel needs an x86-64 build with AVX-512");
  return {q, q};
#endif
}

// The gradients (dq, dk, dv) of train_attention's output given grad_out, from its saved out and lse.
std::vector<torch::Tensor> train_attention_backward(const torch::Tensor& grad, const torch::Tensor& q,
                                                    const torch::Tensor& k, const torch::Tensor& v,
                                                    const torch::Tensor& out, const torch::Tensor& lse) {
#if SC_AMX_BUILD
  check_train_attention(q, k, v);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes() && grad.scalar_type() == q.scalar_type() &&
              out.scalar_type() == q.scalar_type() && grad.stride(3) == 1 && out.stride(3) == 1,
              "grad_out and out must match q");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2) &&
              lse.scalar_type() == torch::kFloat, "lse must be fp32 [B, H, T]");
  return q.scalar_type() == torch::kBFloat16 ? train_attention_backward_typed<c10::BFloat16>(grad, q, k, v, out, lse)
                                             : train_attention_backward_typed<float>(grad, q, k, v, out, lse);
#else
  TORCH_CHECK(false, "the training attention kernel needs an x86-64 build with AVX-512");
  return {};
#endif
}

bool train_attention_available() {
#if SC_AMX_BUILD
  return avx512_available();
#else
  return false;
#endif
}

// ---- the int8 multiply-add ceiling -------------------------------------------------------------
// Independent accumulators and no memory traffic: what the prompt GEMMs are measured against.
// VNNI: one vpdpbusd = 64 multiply-adds (512-bit); AVX2: vpmaddubsw + vpmaddwd + vpaddd = 32.
#if SC_AMX_BUILD
SC_VNNI int64_t int8_peak_vnni(int64_t iterations) {
  __m512i acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_epi32(i);
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
  for (int64_t it = 0; it < iterations; ++it) {
    for (int i = 0; i < 16; ++i) acc[i] = dpbusd(acc[i], a, b);
    __asm__ volatile("" : "+v"(a), "+v"(b));  // the inputs stay unknown to the compiler
  }
  __m512i total = acc[0];
  for (int i = 1; i < 16; ++i) total = _mm512_add_epi32(total, acc[i]);
  return static_cast<int64_t>(_mm512_reduce_add_epi32(total)) & 1;
}
#endif

int64_t int8_peak_avx2(int64_t iterations) {
#if SC_AVX2
  __m256i acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_set1_epi32(i);
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-5), ones = _mm256_set1_epi16(1);
  for (int64_t it = 0; it < iterations; ++it) {
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
    __asm__ volatile("" : "+x"(a), "+x"(b));
  }
  __m256i total = acc[0];
  for (int i = 1; i < 8; ++i) total = _mm256_add_epi32(total, acc[i]);
  return _mm256_extract_epi32(total, 0) & 1;
#else
  (void)iterations;
  return 0;
#endif
}

// Streams `data` once and returns its byte sum: the bandwidth ceiling the kernels above aim at.
int64_t read_bytes(const torch::Tensor& data) {
  const int64_t n = data.numel() / 32;
  const auto* p = reinterpret_cast<const uint8_t*>(data.data_ptr());
  std::vector<int64_t> partial(at::get_num_threads(), 0);
  parallel_rows(n, 4096, [&](int64_t begin, int64_t end) {
#if SC_AVX2
    // Four independent sums, so the loop is bound by the loads, not by one chain of additions.
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    const __m256i zero = _mm256_setzero_si256();
    int64_t i = begin;
    // Prefetched as the decode loops are, so this ceiling is read the way they read.
    for (; i + 4 <= end; i += 4) {
      prefetch_ahead(p + i * 32);
      prefetch_ahead(p + i * 32 + 64);
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm256_add_epi64(acc[j], _mm256_sad_epu8(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (i + j) * 32)), zero));
    }
    for (; i < end; ++i)
      acc[0] = _mm256_add_epi64(acc[0], _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i * 32)), zero));
    const __m256i sum = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
    partial[at::get_thread_num()] += _mm256_extract_epi64(sum, 0) + _mm256_extract_epi64(sum, 1) +
                                     _mm256_extract_epi64(sum, 2) + _mm256_extract_epi64(sum, 3);
#else
    int64_t s = 0;
    for (int64_t i = begin * 32; i < end * 32; ++i) s += p[i];
    partial[at::get_thread_num()] += s;
#endif
  });
  int64_t total = 0;
  for (int64_t v : partial) total += v;
  return total;
}

// ---- prompt GEMMs on AMX: int8 x int8 -> int32 tiles ------------------------------------------
// Prompts multiply many activation rows by each weight, so they are bound by arithmetic, not by
// memory. On CPUs with AMX-INT8 one tile instruction multiplies a 16x64 int8 block by a 64x16 one;
// these loops feed it. Activations are quantized per row (token): x[m, k] ~ sx[m] * qx[m, k].
//
// The weight is the tile's left operand, read in place from its row-major [N, K] layout (16 rows
// of 64 bytes), so the decode kernels and the prompt GEMM share one copy of the weights. The right
// operand must be in the "VNNI" layout (row r holds, for 16 columns, 4 consecutive k), which the
// activation quantizer writes directly: [M/16][K/64][16 (k/4)][16 (m)][4 (k)]. The product is
// therefore yᵀ in tiles; the epilogue rescales and transposes each 16x16 tile as it stores it.
// int4 weights are converted, 32 rows at a time, to int8 with one scale per row (a 16-entry table
// lookup per group), kept in a small buffer reused for every activation row.
//
// Compiled with per-function target attributes and entered only after a run-time check of the
// CPU (cpuid) and the kernel's permission to use tile state (arch_prctl), so one build serves
// every machine. CPUs with AVX-512 VNNI but no AMX run the same packed layout through vpdpbusd
// (below); AVX2-only CPUs have no int8 prompt kernel here and take the float path.


bool amx_available() {
#if SC_AMX_BUILD
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx = (d & (1u << 24)) && (d & (1u << 25));        // AMX-TILE, AMX-INT8
    const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 17)) && (b & (1u << 31));  // F BW DQ VL
    unsigned a1, b1, c1, d1;
    const bool bf16 = __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 5));  // AVX512_BF16
    // Linux hands out the 8 KiB of tile state per process on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
    return amx && avx512 && bf16 && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

#if SC_AMX_BUILD
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// 16 vectors of 16 lanes: r[i][j] -> r[j][i].
SC_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {  // 128-bit lanes: [a0 a2 b0 b2] etc., then whole columns
    const __m512 ab_lo = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), ab_hi = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    const __m512 cd_lo = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88), cd_hi = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0xDD);
  }
}

SC_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SC_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

SC_AMX inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
SC_AMX inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

template <typename T>
SC_AVX512 inline __m128i quantize16(const T* p, __m512 inv) {  // round half to even, as nearbyint
  return _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(load16(p), inv)));
}

// 16 activation rows (those from `rows` on are zero) -> K/64 tiles in the VNNI layout; scale per row.
template <typename T>
SC_AVX512 void pack_rows(const T* x, int64_t K, int64_t rows, int8_t* out, float* sx) {
  float inv[16];
  for (int64_t i = 0; i < 16; ++i) {
    float amax = 0.f;
    if (i < rows) {
      __m512 m = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(load16(x + i * K + k)));
      amax = _mm512_reduce_max_ps(m);
    }
    inv[i] = amax > 0.f ? 127.f / amax : 0.f;
    sx[i] = amax / 127.f;
  }
  for (int64_t kc = 0; kc < K / 64; ++kc) {
    __m512 r[16];
    for (int64_t i = 0; i < 16; ++i) {
      if (i >= rows) {
        r[i] = _mm512_setzero_ps();
        continue;
      }
      const T* p = x + i * K + kc * 64;
      const __m512 s = _mm512_set1_ps(inv[i]);
      __m512i v = _mm512_castsi128_si512(quantize16(p, s));
      v = _mm512_inserti32x4(v, quantize16(p + 16, s), 1);
      v = _mm512_inserti32x4(v, quantize16(p + 32, s), 2);
      v = _mm512_inserti32x4(v, quantize16(p + 48, s), 3);
      r[i] = _mm512_castsi512_ps(v);
    }
    transpose16(r);  // as 32-bit groups: [m][k/4] -> [k/4][m]
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(out + kc * 1024 + j * 64, _mm512_castps_si512(r[j]));
  }
}

// A tile of yᵀ (int32 [16 n][16 m]) -> y[m, n] = rescale(acc, sx[m], sw[n], b[n]) for the first `rows` m.
template <typename T>
SC_AMX void store_tile(const int32_t* acc, const float* sx, const float* sw, const float* b, T* y, int64_t N,
                       int64_t rows) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + 16 * i));
  transpose16(r);
  const __m512 ws = _mm512_loadu_ps(sw), bias = b ? _mm512_loadu_ps(b) : _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; ++m)
    store16(y + m * N, _mm512_fmadd_ps(r[m], _mm512_mul_ps(_mm512_set1_ps(sx[m]), ws), bias));
}

SC_AMX inline void load_tile_config() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) {
    config.colsb[i] = 64;
    config.rows[i] = 16;
  }
  _tile_loadconfig(&config);
}

// 32 weight rows (row stride ldw) against every packed activation row, over the K chunks (of 64)
// [c0, c1) -> the int32 sums `acc` ([pairs][4][256]: 2x2 tiles per pair of 16-row blocks), which
// carry over from the previous slice unless c0 == 0; after the last slice they are rescaled into
// y[:, n0:n0+32]. Tiles 0-3 accumulate, 4-5 hold weight rows, 6-7 activation columns.
//
// A pair's rescale (a transpose per tile) runs on the vector units while the tile unit works on the
// next pair: its four tiles are spread over the next pair's K loop, where the out-of-order window
// overlaps them with queued tile products; run after the loop, it left the tile unit idle.
template <typename T>
SC_AMX void amx_weight_block(const int8_t* w, int64_t ldw, const float* sw, const float* b, int64_t n0,
                             const int8_t* xp, const float* sx, int64_t M, int64_t N, int64_t K, int64_t c0,
                             int64_t c1, int32_t* acc, T* y) {
  const int64_t chunks = K / 64, pairs = (M + 31) / 32, steps = c1 - c0;
  const bool last = c1 == chunks;
  const int8_t* w1 = w + 16 * ldw;
  auto rescale = [&](int64_t pair, int t) {
    const int64_t n = (t / 2) * 16, m0 = pair * 32 + (t % 2) * 16;
    if (m0 < M) store_tile(acc + pair * 1024 + 256 * t, sx + m0, sw + n, b ? b + n0 + n : nullptr,
                           y + m0 * N + n0 + n, N, std::min<int64_t>(16, M - m0));
  };
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int8_t* x0 = xp + 2 * pair * chunks * 1024;
    const int8_t* x1 = x0 + chunks * 1024;
    int32_t* a = acc + pair * 1024;
    if (c0 == 0) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    } else {
      _tile_loadd(0, a, 64);
      _tile_loadd(1, a + 256, 64);
      _tile_loadd(2, a + 512, 64);
      _tile_loadd(3, a + 768, 64);
    }
    int pending = last && pair > 0 ? 0 : 4;  // the previous pair's tiles still to rescale
    for (int64_t kc = c0; kc < c1; ++kc) {
      _tile_loadd(4, w + kc * 64, ldw);
      _tile_loadd(6, x0 + kc * 1024, 64);
      _tile_dpbssd(0, 4, 6);
      _tile_loadd(7, x1 + kc * 1024, 64);
      _tile_dpbssd(1, 4, 7);
      _tile_loadd(5, w1 + kc * 64, ldw);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
      if (pending < 4 && (kc - c0) * 4 >= pending * steps) rescale(pair - 1, pending++);
    }
    while (pending < 4) rescale(pair - 1, pending++);
    _tile_stored(0, a, 64);
    _tile_stored(1, a + 256, 64);
    _tile_stored(2, a + 512, 64);
    _tile_stored(3, a + 768, 64);
  }
  if (last)
    for (int t = 0; t < 4; ++t) rescale(pairs - 1, t);
}

// The K chunks of one slice: the packed activations of a slice (every row, its K range) stay in L2
// while all weight blocks pass over them; unsliced, a long K (the MLP's down projection) streams
// its activations from L3 once per block of 32 weight rows (docs/performance.md has the figures).
inline int64_t amx_slices(int64_t M, int64_t K) {
  // Three quarters of this core's L2 (2 MiB on the AMX Xeons so far) for the slice.
  static const int64_t budget = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return (l2 > 0 ? int64_t(l2) : int64_t(2) << 20) * 3 / 4;
  }();
  const int64_t chunks = K / 64, per_slice = std::max<int64_t>(4, budget / ((M + 31) / 32 * 32 * 64));
  return (chunks + per_slice - 1) / per_slice;
}
inline std::pair<int64_t, int64_t> amx_slice(int64_t slice, int64_t slices, int64_t K) {
  const int64_t chunks = K / 64;
  return {chunks * slice / slices, chunks * (slice + 1) / slices};
}

// Where a block's partial sums live: one buffer per thread when K is one slice, else a buffer for
// every block (`sums`, [blocks][pairs * 1024]) that carries them from one slice to the next.
inline int32_t* align64(int32_t* p) {
  return reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

template <typename T>
SC_AMX void amx_int8_blocks(std::atomic<int64_t>& next, int64_t blocks, const int8_t* xp, const float* sx, int64_t M,
                            const int8_t* w, const float* sw, const float* b, int64_t N, int64_t K, int64_t c0,
                            int64_t c1, int32_t* sums, T* y) {
  const int64_t pairs = (M + 31) / 32;
  std::vector<int32_t> own(sums ? 0 : pairs * 1024 + 16);
  load_tile_config();
  for (int64_t nb; (nb = next.fetch_add(1)) < blocks;)
    amx_weight_block(w + nb * 32 * K, K, sw + nb * 32, b, nb * 32, xp, sx, M, N, K, c0, c1,
                     sums ? sums + nb * pairs * 1024 : align64(own.data()), y);
  _tile_release();
}

// int4 weights: each block's slice converted to int8 (on the row's whole-K grid) into a buffer.
template <typename T>
SC_AMX void amx_int4_blocks(std::atomic<int64_t>& next, int64_t blocks, const int8_t* xp, const float* sx, int64_t M,
                            const uint8_t* w, const c10::Half* scale, const c10::Half* minimum, int64_t group_size,
                            const float* b, int64_t N, int64_t K, int64_t c0, int64_t c1, int32_t* sums, T* y) {
  const int64_t pairs = (M + 31) / 32;
  std::vector<int32_t> own(sums ? 0 : pairs * 1024 + 16);
  std::vector<int8_t> rows(32 * K);
  alignas(64) float c[32];
  const int64_t groups = K / group_size;
  load_tile_config();
  for (int64_t nb; (nb = next.fetch_add(1)) < blocks;) {
    int4_rows_to_int8(w + nb * 32 * (K / 2), scale + nb * 32 * groups, minimum + nb * 32 * groups, K, group_size,
                      32, rows.data(), c, c0 * 64, c1 * 64);
    amx_weight_block(rows.data(), K, c, b, nb * 32, xp, sx, M, N, K, c0, c1,
                     sums ? sums + nb * pairs * 1024 : align64(own.data()), y);
  }
  _tile_release();
}
// Four tile products a step on tiles loaded once: the AMX-INT8 multiply-add ceiling.
SC_AMX int64_t int8_peak_amx(int64_t iterations) {
  alignas(64) int8_t a[16 * 64], b[16 * 64];
  for (int i = 0; i < 16 * 64; ++i) a[i] = static_cast<int8_t>(i % 7 - 3), b[i] = static_cast<int8_t>(i % 5 - 2);
  load_tile_config();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, b, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, a, 64);
  for (int64_t it = 0; it < iterations; ++it) {
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  alignas(64) int32_t out[16 * 16];
  _tile_stored(0, out, 64);
  _tile_release();
  return out[0] & 1;
}
#endif  // SC_AMX_BUILD

// ---- the same on AVX-512 VNNI (no AMX): vpdpbusd ----------------------------------------------
// One vpdpbusd multiplies 64 unsigned by 64 signed bytes into 16 int32 sums of 4: the packed
// activation rows (16 rows x 4 k per 64 bytes) are its unsigned operand after adding 128 (xor 0x80),
// a weight's 4 bytes broadcast to all lanes the signed one; 128 x (row sum of the weight) comes off
// again in the epilogue. 8 weight rows x 3 blocks of 16 activation rows stay in 24 registers.

bool vnni_available() {
#if SC_AMX_BUILD
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 17)) && (b & (1u << 31)) && (c & (1u << 11));
  }();
  return ready;
#else
  return false;
#endif
}

#if SC_AMX_BUILD

template <int BLOCKS, typename T>
SC_VNNI void vnni_tile(const int8_t* w, int64_t ldw, const int32_t* wsum, const float* sw, const float* b, int64_t n0,
                       const int8_t* xp, const float* sx, int64_t m0, int64_t M, int64_t N, int64_t K, T* y) {
  const int64_t chunks = K / 64;
  __m512i acc[8][BLOCKS];
  for (int n = 0; n < 8; ++n)
    for (int j = 0; j < BLOCKS; ++j) acc[n][j] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* blocks[BLOCKS];
  for (int j = 0; j < BLOCKS; ++j) blocks[j] = xp + (m0 / 16 + j) * chunks * 1024;
  for (int64_t kc = 0; kc < chunks; ++kc) {
    for (int r = 0; r < 16; ++r) {
      __m512i x[BLOCKS];
      for (int j = 0; j < BLOCKS; ++j)
        x[j] = _mm512_xor_si512(_mm512_loadu_si512(blocks[j] + kc * 1024 + r * 64), flip);
      const int64_t k = kc * 64 + r * 4;
      for (int n = 0; n < 8; ++n) {
        int32_t four;
        std::memcpy(&four, w + n * ldw + k, 4);
        const __m512i wv = _mm512_set1_epi32(four);
        for (int j = 0; j < BLOCKS; ++j) acc[n][j] = dpbusd(acc[n][j], x[j], wv);
      }
    }
  }
  alignas(64) int32_t out[8][BLOCKS * 16];
  for (int n = 0; n < 8; ++n)
    for (int j = 0; j < BLOCKS; ++j) _mm512_store_si512(out[n] + 16 * j, acc[n][j]);
  for (int64_t m = 0; m < BLOCKS * 16 && m0 + m < M; ++m)
    for (int n = 0; n < 8; ++n) {
      y[(m0 + m) * N + n0 + n] = static_cast<T>(rescale(out[n][m] - 128 * wsum[n], sx[m0 + m], sw[n], b ? b[n0 + n] : 0.f));
    }
}

// 8 weight rows against every packed activation row.
template <typename T>
SC_VNNI void vnni_weight_block(const int8_t* w, int64_t ldw, const float* sw, const float* b, int64_t n0,
                               const int8_t* xp, const float* sx, int64_t M, int64_t N, int64_t K, T* y) {
  int32_t wsum[8];
  for (int n = 0; n < 8; ++n) {
    __m512i s = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64)  // sum of signed bytes: sad of (w xor 0x80) minus 128 each
      s = _mm512_add_epi64(s, _mm512_sad_epu8(_mm512_xor_si512(_mm512_loadu_si512(w + n * ldw + k),
                                                               _mm512_set1_epi8(static_cast<char>(0x80))),
                                              _mm512_setzero_si512()));
    wsum[n] = static_cast<int32_t>(_mm512_reduce_add_epi64(s) - 128 * K);
  }
  const int64_t blocks = (M + 15) / 16;
  int64_t blk = 0;
  for (; blk + 3 <= blocks; blk += 3) vnni_tile<3>(w, ldw, wsum, sw, b, n0, xp, sx, blk * 16, M, N, K, y);
  if (blocks - blk == 2) vnni_tile<2>(w, ldw, wsum, sw, b, n0, xp, sx, blk * 16, M, N, K, y);
  if (blocks - blk == 1) vnni_tile<1>(w, ldw, wsum, sw, b, n0, xp, sx, blk * 16, M, N, K, y);
}
#endif  // SC_AMX_BUILD

#if SC_AMX_BUILD
template <typename T>
SC_VNNI void vnni_int8_blocks(std::atomic<int64_t>& next, int64_t blocks, const int8_t* xp, const float* sx, int64_t M,
                              const int8_t* w, const float* sw, const float* b, int64_t N, int64_t K, T* y) {
  for (int64_t nb; (nb = next.fetch_add(1)) < blocks;)
    for (int64_t part = 0; part < 4; ++part) {
      const int64_t n0 = nb * 32 + part * 8;
      vnni_weight_block(w + n0 * K, K, sw + n0, b, n0, xp, sx, M, N, K, y);
    }
}

template <typename T>
SC_VNNI void vnni_int4_blocks(std::atomic<int64_t>& next, int64_t blocks, const int8_t* xp, const float* sx, int64_t M,
                              const uint8_t* w, const c10::Half* scale, const c10::Half* minimum, int64_t group_size,
                              const float* b, int64_t N, int64_t K, T* y) {
  std::vector<int8_t> rows(32 * K);
  alignas(64) float c[32];
  const int64_t groups = K / group_size;
  for (int64_t nb; (nb = next.fetch_add(1)) < blocks;) {
    int4_rows_to_int8(w + nb * 32 * (K / 2), scale + nb * 32 * groups, minimum + nb * 32 * groups, K, group_size,
                      32, rows.data(), c);
    for (int64_t part = 0; part < 4; ++part)
      vnni_weight_block(rows.data() + part * 8 * K, K, c + part * 8, b, nb * 32 + part * 8, xp, sx, M, N, K, y);
  }
}
#endif

// Activations quantized per row into the tiles' layout: (packed int8 [ceil(M/32)*32 * K], scale [.]).
std::pair<torch::Tensor, torch::Tensor> pack_activations(const torch::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), padded = (M + 31) / 32 * 32;
  torch::Tensor packed = torch::empty({padded * K}, x.options().dtype(torch::kInt8));
  torch::Tensor scale = torch::empty({padded}, x.options().dtype(torch::kFloat32));
#if SC_AMX_BUILD
  int8_t* xp = packed.data_ptr<int8_t>();
  float* sx = scale.data_ptr<float>();
  at::parallel_for(0, padded / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t rows = std::clamp<int64_t>(M - blk * 16, 0, 16), offset = blk * 16 * K;
      if (x.scalar_type() == torch::kBFloat16)
        pack_rows(x.data_ptr<c10::BFloat16>() + (rows ? offset : 0), K, rows, xp + offset, sx + blk * 16);
      else
        pack_rows(x.data_ptr<float>() + (rows ? offset : 0), K, rows, xp + offset, sx + blk * 16);
    }
  });
#endif
  return {packed, scale};
}

// Which prompt GEMM this CPU runs: "amx", "avx512-vnni", or "" (none: prompts take the float path).
std::string prompt_isa() {
  return amx_available() ? "amx" : vnni_available() ? "avx512-vnni" : SC_AVX2 ? "avx2" : "";
}

// (ops per second on all of torch's threads, the instruction set it timed). `isa` "" times the one
// the prompt GEMMs use here (AMX tiles multiply 8x as many int8 pairs an instruction as vpdpbusd,
// so a VNNI ceiling would understate what an AMX GEMM can reach); "" is nothing where there is none.
std::pair<double, std::string> int8_peak(int64_t iterations, const std::string& isa) {
  const std::string chosen = isa.empty() ? prompt_isa() : isa;
  TORCH_CHECK(chosen.empty() || chosen == "amx" || chosen == "avx512-vnni" || chosen == "avx2",
              "isa must be '' (the prompt GEMMs' own), 'amx', 'avx512-vnni' or 'avx2'");
  TORCH_CHECK(chosen != "amx" || amx_available(), "this CPU has no AMX-INT8");
  TORCH_CHECK(chosen != "avx512-vnni" || vnni_available(), "this CPU has no AVX-512 VNNI");
  if (chosen.empty() || (chosen == "avx2" && !SC_AVX2)) return {0.0, ""};
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> sink{0};
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
#if SC_AMX_BUILD
      if (chosen == "amx") sink += int8_peak_amx(iterations / 16);  // a tile step is 16x a vpdpbusd step
      else if (chosen == "avx512-vnni") sink += int8_peak_vnni(iterations);
      else sink += int8_peak_avx2(iterations);
#else
      sink += int8_peak_avx2(iterations);
#endif
    }
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // per iteration: AMX 4 tile products of 16x16 outputs over 64 pairs; VNNI 16 x 64 pairs; AVX2 8 x 32
  const double ops = chosen == "amx" ? 4.0 * 16 * 16 * 64 * 2 * (iterations / 16)
                     : chosen == "avx512-vnni" ? 16.0 * 64 * 2 * iterations : 8.0 * 32 * 2 * iterations;
  return {ops * threads / seconds, chosen};
}


// isa: "" picks the best this CPU has; "amx" or "avx512-vnni" ask for one (tests compare them).
// The prompt GEMM to run: `isa` ("amx", "avx512-vnni", "avx2"), or by default the best this CPU has.
std::string prompt_kernel(const std::string& isa) {
  const std::string chosen = isa.empty() ? prompt_isa() : isa;
  TORCH_CHECK(chosen == "amx" || chosen == "avx512-vnni" || chosen == "avx2",
              "the prompt GEMM kernels need AMX-INT8, AVX-512 VNNI or AVX2 (this CPU has none of them)");
  TORCH_CHECK(chosen == "amx" ? amx_available() : chosen == "avx512-vnni" ? vnni_available() : bool(SC_AVX2),
              "this CPU cannot run the ", chosen, " kernel");
  return chosen;
}

void check_prompt(const torch::Tensor& x, int64_t N, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() &&
              (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x must be a contiguous 2-D float32 or bfloat16 CPU tensor");
  TORCH_CHECK(x.size(1) % 64 == 0 && N % 32 == 0, "the prompt GEMM needs K % 64 == 0 and N % 32 == 0");
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, "bias has the wrong shape");
}

#if SC_AMX_BUILD
// Runs `blocks(next, m0, rows, c0, c1, sums)` on every thread for each chunk of at most kPromptRows
// activation rows and, within it, each K slice (AMX; the VNNI loop takes K whole). Chunking the rows
// keeps a slice's activations in L2 and the int32 sums carried between slices (rows x N) small for
// prompts of any length. Blocks of 32 output channels go to whichever thread is free next: on a
// shared machine a thread that loses its core does not hold the other back at the join, as an even
// split would.
constexpr int64_t kPromptRows = 512;
template <typename Blocks>
void for_each_slice(bool amx, int64_t M, int64_t N, int64_t K, Blocks blocks) {
  std::unique_ptr<int32_t[]> sums;
  for (int64_t m0 = 0; m0 < M; m0 += kPromptRows) {
    const int64_t rows = std::min(kPromptRows, M - m0), slices = amx ? amx_slices(rows, K) : 1;
    if (slices > 1 && !sums) sums.reset(new int32_t[N / 32 * (kPromptRows / 32) * 1024 + 16]);
    for (int64_t slice = 0; slice < slices; ++slice) {
      const auto [c0, c1] = amx ? amx_slice(slice, slices, K) : std::pair<int64_t, int64_t>{0, K / 64};
      std::atomic<int64_t> next{0};
      at::parallel_for(0, at::get_num_threads(), 1, [&, c0 = c0, c1 = c1](int64_t, int64_t) {
        blocks(next, m0, rows, c0, c1, slices > 1 ? align64(sums.get()) : nullptr);
      });
    }
  }
}
#endif

torch::Tensor prompt_int8_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                                 const c10::optional<torch::Tensor>& bias, const std::string& isa) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_prompt(x, N, bias);
  TORCH_CHECK(weight.scalar_type() == torch::kInt8 && weight.is_contiguous() && weight.size(1) == K,
              "weight must be contiguous int8 [N, K]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N,
              "scale must be fp32 [N]");
  const std::string kernel = prompt_kernel(isa);
  const bool amx = kernel == "amx";
  torch::Tensor y = torch::empty({M, N}, x.options());
  const FloatBias b(bias);
  const float* bp = b.data();
  const int8_t* w = weight.data_ptr<int8_t>();
#if SC_AVX2
  if (kernel == "avx2") {
    auto rows = [&](int64_t n0, int64_t count, int8_t* out) { std::memcpy(out, w + n0 * K, count * K); };
    if (x.scalar_type() == torch::kBFloat16) avx2_prompt_gemm(x, N, scale.data_ptr<float>(), bp, rows, y.data_ptr<c10::BFloat16>());
    else avx2_prompt_gemm(x, N, scale.data_ptr<float>(), bp, rows, y.data_ptr<float>());
    return y;
  }
#endif
#if SC_AMX_BUILD
  const auto [packed_x, scale_x] = pack_activations(x);
  const torch::Tensor packed = packed_x, sx = scale_x;  // lambdas cannot capture structured bindings in C++17
  const int8_t* xp = packed.data_ptr<int8_t>();
  const int64_t blocks = N / 32;
  for_each_slice(amx, M, N, K, [&](std::atomic<int64_t>& next, int64_t m0, int64_t rows, int64_t c0, int64_t c1,
                                   int32_t* sums) {
    if (x.scalar_type() == torch::kBFloat16) {
      auto* out = y.data_ptr<c10::BFloat16>() + m0 * N;
      if (amx) amx_int8_blocks(next, blocks, xp + m0 * K, sx.data_ptr<float>() + m0, rows, w, scale.data_ptr<float>(), bp, N, K, c0, c1, sums, out);
      else vnni_int8_blocks(next, blocks, xp + m0 * K, sx.data_ptr<float>() + m0, rows, w, scale.data_ptr<float>(), bp, N, K, out);
    } else {
      auto* out = y.data_ptr<float>() + m0 * N;
      if (amx) amx_int8_blocks(next, blocks, xp + m0 * K, sx.data_ptr<float>() + m0, rows, w, scale.data_ptr<float>(), bp, N, K, c0, c1, sums, out);
      else vnni_int8_blocks(next, blocks, xp + m0 * K, sx.data_ptr<float>() + m0, rows, w, scale.data_ptr<float>(), bp, N, K, out);
    }
  });
#endif
  return y;
}

torch::Tensor prompt_int4_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                                 const torch::Tensor& minimum, int64_t group_size,
                                 const c10::optional<torch::Tensor>& bias, const std::string& isa) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_prompt(x, N, bias);
  TORCH_CHECK(group_size % 32 == 0 && group_size > 0 && K % group_size == 0, "group size must be a multiple of 32 dividing K");
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.is_contiguous() && weight.size(1) * 2 == K,
              "weight must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && minimum.scalar_type() == torch::kHalf && scale.is_contiguous() &&
              minimum.is_contiguous() && scale.numel() == N * (K / group_size) && minimum.numel() == scale.numel(),
              "scale and min must be fp16 [N, K / group_size]");
  const std::string kernel = prompt_kernel(isa);
  const bool amx = kernel == "amx";
  torch::Tensor y = torch::empty({M, N}, x.options());
  const FloatBias b(bias);
  const float* bp = b.data();
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const c10::Half* s = scale.data_ptr<c10::Half>();
  const c10::Half* mn = minimum.data_ptr<c10::Half>();
#if SC_AVX2
  if (kernel == "avx2") {
    const int64_t groups = K / group_size;
    std::vector<float> grid(N);  // each output channel's int8 scale, set as its rows are converted
    auto rows = [&](int64_t n0, int64_t count, int8_t* out) {
      int4_rows_to_int8(w + n0 * (K / 2), s + n0 * groups, mn + n0 * groups, K, group_size, count, out,
                        grid.data() + n0);
    };
    if (x.scalar_type() == torch::kBFloat16) avx2_prompt_gemm(x, N, grid.data(), bp, rows, y.data_ptr<c10::BFloat16>());
    else avx2_prompt_gemm(x, N, grid.data(), bp, rows, y.data_ptr<float>());
    return y;
  }
#endif
#if SC_AMX_BUILD
  const auto [packed_x, scale_x] = pack_activations(x);
  const torch::Tensor packed = packed_x, sx = scale_x;
  const int8_t* xp = packed.data_ptr<int8_t>();
  const int64_t blocks = N / 32;
  for_each_slice(amx, M, N, K, [&](std::atomic<int64_t>& next, int64_t m0, int64_t rows, int64_t c0, int64_t c1,
                                   int32_t* sums) {
    if (x.scalar_type() == torch::kBFloat16) {
      auto* out = y.data_ptr<c10::BFloat16>() + m0 * N;
      if (amx) amx_int4_blocks(next, blocks, xp + m0 * K, sx.data_ptr<float>() + m0, rows, w, s, mn, group_size, bp, N, K, c0, c1, sums, out);
      else vnni_int4_blocks(next, blocks, xp + m0 * K, sx.data_ptr<float>() + m0, rows, w, s, mn, group_size, bp, N, K, out);
    } else {
      auto* out = y.data_ptr<float>() + m0 * N;
      if (amx) amx_int4_blocks(next, blocks, xp + m0 * K, sx.data_ptr<float>() + m0, rows, w, s, mn, group_size, bp, N, K, c0, c1, sums, out);
      else vnni_int4_blocks(next, blocks, xp + m0 * K, sx.data_ptr<float>() + m0, rows, w, s, mn, group_size, bp, N, K, out);
    }
  });
#endif
  return y;
}

// ---- the small ops of a decode step -----------------------------------------------------------

// GPT-NeoX's rotary step in the dtype T, rounding where PyTorch's separate ops round, so the result
// equals model.apply_rotary's bit for bit: x·cos and rotate_half(x)·sin each rounded to T, then their
// sum. fp-contract is off so fp32 keeps the two products unfused, as PyTorch's mul and add are.
template <typename T>
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void rotate_half_split(const T* x, const T* cos, const T* sin, int64_t rotary, int64_t D, T* out) {
  const int64_t half = rotary / 2;
  for (int64_t i = 0; i < rotary; ++i) {
    const float rotated = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
    const T a = static_cast<T>(static_cast<float>(x[i]) * static_cast<float>(cos[i]));
    const T b = static_cast<T>(rotated * static_cast<float>(sin[i]));
    out[i] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
  }
  for (int64_t i = rotary; i < D; ++i) out[i] = x[i];
}

template <typename T>
void rotary_heads_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                       int64_t D, torch::Tensor& out) {
  const int64_t B = qkv.size(0), T_ = qkv.size(1), H = qkv.size(2) / (3 * D), R = cos.size(2);
  const bool per_row = cos.size(0) > 1;
  const T* src = qkv.data_ptr<T>();
  const T* c = cos.data_ptr<T>();
  const T* sn = sin.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const int64_t part = B * H * T_ * D;  // q, k and v one after another
  at::parallel_for(0, B * T_, std::max<int64_t>(1, 4096 / std::max<int64_t>(H * D, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T_, t = bt % T_;
      const T* cs = c + ((per_row ? b : 0) * T_ + t) * R;
      const T* sns = sn + ((per_row ? b : 0) * T_ + t) * R;
      for (int64_t h = 0; h < H; ++h) {
        const T* head = src + bt * 3 * H * D + h * 3 * D;
        const int64_t at = ((b * H + h) * T_ + t) * D;
        rotate_half_split(head, cs, sns, R, D, dst + at);
        rotate_half_split(head + D, cs, sns, R, D, dst + part + at);
        std::copy(head + 2 * D, head + 3 * D, dst + 2 * part + at);
      }
    }
  });
}

// [3, B, H, T, D]: q, k (both rotated) and v of the fused projection qkv [B, T, H·3D] (per head
// [q_h, k_h, v_h]), with cos/sin [1 or B, T, R] over the first R dims of each head.
torch::Tensor rotary_heads(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                           int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && head_dim > 0 && qkv.size(2) % (3 * head_dim) == 0,
              "qkv must be contiguous [B, T, heads * 3 * head_dim]");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.is_contiguous() && sin.is_contiguous() &&
              (cos.size(0) == 1 || cos.size(0) == qkv.size(0)) && cos.size(1) == qkv.size(1) &&
              cos.size(2) % 2 == 0 && cos.size(2) <= head_dim,
              "cos and sin must be contiguous [1 or B, T, even rotary dims <= head_dim]");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "cos and sin must have qkv's dtype");
  const int64_t B = qkv.size(0), T_ = qkv.size(1), H = qkv.size(2) / (3 * head_dim);
  torch::Tensor out = torch::empty({3, B, H, T_, head_dim}, qkv.options());
  if (qkv.scalar_type() == torch::kBFloat16) rotary_heads_impl<c10::BFloat16>(qkv, cos, sin, head_dim, out);
  else if (qkv.scalar_type() == torch::kFloat32) rotary_heads_impl<float>(qkv, cos, sin, head_dim, out);
  else TORCH_CHECK(false, "qkv must be fp32 or bf16");
  return out;
}

#if SC_AVX2
// x/2 · (1 + erf(x/√2)), erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7). For x < 0 the sum
// is erfc(|x|/√2) itself, taken as it is rather than as 1 minus a number close to 1.
inline __m256 gelu8(__m256 x) {
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 sign = _mm256_and_ps(z, _mm256_set1_ps(-0.f));
  const __m256 a = _mm256_xor_ps(z, sign);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, _mm256_set1_ps(1.f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
  const __m256 erfc = _mm256_mul_ps(_mm256_mul_ps(p, t), e);
  const __m256 one_plus_erf = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.f), erfc), erfc, sign);
  return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), one_plus_erf);
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {  // round to nearest even, as c10::BFloat16(float)
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1)));
}
#endif

template <typename T>
void gelu_impl(const T* x, T* y, int64_t n) {
  int64_t i = 0;
#if SC_AVX2
  for (; i + 8 <= n; i += 8) store8(y + i, gelu8(load8(x + i)));
#endif
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    y[i] = static_cast<T>(0.5f * v * (1.f + std::erf(v * 0.70710678118654752f)));
  }
}

// Exact (erf) GELU on this thread alone, for a decode step's rows (10,240 values at the 3B shape).
// Between the decode kernels PyTorch's took ~7x its standalone time: it splits such a row across
// threads, and its code runs cold after a kernel has streamed the weights (docs/performance.md).
torch::Tensor serial_gelu(const torch::Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  torch::Tensor y = torch::empty_like(x);
  if (x.scalar_type() == torch::kBFloat16) gelu_impl(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), x.numel());
  else if (x.scalar_type() == torch::kFloat32) gelu_impl(x.data_ptr<float>(), y.data_ptr<float>(), x.numel());
  else TORCH_CHECK(false, "x must be fp32 or bf16");
  return y;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "y = x @ dequant(int8 W).T + b with int8-quantized activations",
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("row_sums"), py::arg("bias"), py::arg("isa") = "");
  m.def("int4_linear", &int4_linear, "y = x @ dequant(int4 W).T + b with int8-quantized activations",
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("minimum"), py::arg("group_size"),
        py::arg("bias"), py::arg("isa") = "");
  m.def("bf16_linear", &bf16_linear, "y = x @ W.T + b for bf16 W, fp32 accumulation",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("isa") = "");
  m.def("decode_attention", &decode_attention, "softmax(q k^T / sqrt(D)) v for one query per row and head",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("rows") = py::none(), py::arg("lengths") = py::none(),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("store_kv", &store_kv, "write x [B, H, T, D] into flat slots of one layer's cache [R, H, S, D] (quantized for int8)",
        py::arg("cache"), py::arg("scales"), py::arg("slots"), py::arg("x"));
  m.def("rotary_heads", &rotary_heads, "[3, B, H, T, D]: q, k rotated and v from the fused projection [B, T, H*3D]",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("head_dim"));
  m.def("serial_gelu", &serial_gelu, "exact GELU on the calling thread alone", py::arg("x"));
  m.def("read_bytes", &read_bytes, "sum of all bytes (a memory-bandwidth probe)");
  m.def("prefill_attention", &prefill_attention, "causal attention of a prompt over keys from slot 0 (bf16)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("start"));
  m.def("train_attention", &train_attention, "causal attention for training: (out, log-sum-exp), fp32 or bf16",
        py::arg("q"), py::arg("k"), py::arg("v"));
  m.def("train_attention_backward", &train_attention_backward, "(dq, dk, dv) of train_attention",
        py::arg("grad"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"));
  m.def("train_attention_available", &train_attention_available, "whether this CPU runs train_attention (AVX-512)");
  m.def("bf16_attention_available", &bf16_kernel_available, "whether this CPU runs prefill_attention (AVX512-BF16)");
  m.def("int8_peak", &int8_peak, "int8 multiply-add ops/s from registers on all threads, and the instruction set",
        py::arg("iterations"), py::arg("isa") = "");
  m.def("simd", []() { return SC_AVX2 ? "avx2" : "generic"; });
  m.def("prompt_isa", &prompt_isa, "the prompt GEMM this CPU runs: amx, avx512-vnni, avx2 or '' (none)");
  m.def("prompt_int8_linear", &prompt_int8_linear, "x @ dequant(int8 W).T + b, activations int8 per row",
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("bias"), py::arg("isa") = "");
  m.def("prompt_int4_linear", &prompt_int4_linear, "x @ dequant(int4 W).T + b, activations int8 per row",
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("minimum"), py::arg("group_size"),
        py::arg("bias"), py::arg("isa") = "");
}
