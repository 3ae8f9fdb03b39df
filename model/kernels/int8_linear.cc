// int8_dynamic's linear layers for a few rows, as one XLA CPU custom call per input:
//
//   x [M, I] float32, then N weights w_j [O_j, I] int8 with scales s_j [O_j] float32
//   out_j [M, O_j] float32 = (float(sum_i xq[m, i] * w_j[o, i]) * xs[m]) * s_j[o]
//
// where every row of x is rounded to int8 with its own scale, xs[m] = max_i |x[m, i]| * (1/127)
// (1 for an all-zero row) and xq = round_half_even(x * (1 / xs)). These are the float
// operations of model/transformer.py's _matmul_int8 in its order, so the results are the
// same floats.
// One call takes every weight that multiplies the same x (q, k and v; gate and up): the
// row is quantized once and the threads are woken once.
//
// Why: a decode step multiplies one row (or a few) by every weight. XLA CPU's own int8 path
// (YNNPACK) reads the weights at ~12-20 GB/s there, and each product also costs two small
// single-threaded XLA ops around it (the quantization and the rescale); this loop streams
// the weights at memory speed. The byte dot products are exact int32 sums (for I < 65536)
// in either of the two builds (simd.h); they differ only in how a product is formed:
//   * AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes, so xq is stored biased by
//     +128 (xq ^ 0x80 as a byte) and 128 * sum_i w[o, i] is taken off again.
//   * AVX2: vpmaddubsw multiplies |w| (unsigned, up to 128) by xq with w's sign moved onto
//     it (vpsignb), then vpmaddwd widens the pairs to int32. A pair is at most
//     2 * 128 * 127 = 32512 in size, so it cannot saturate int16: |xq| <= 127 by its rounding.
//
// A row holding NaN or an infinity gives NaN outputs (XLA's path gives garbage there too;
// NaN makes the step's finiteness check catch it).
//
// Threads: the weights' rows are cut into chunks, shared out by ParallelFor (parallel.h).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Weight {
  const int8_t* w;      // [rows, in]
  const float* scale;   // [rows]
  float* out;           // [M, rows]
  int64_t rows;
};

struct Problem {
  std::vector<uint8_t> x;   // [M, I]: xq in its stored form (stored())
  std::vector<float> x_scale;  // [M]
  std::vector<Weight> weights;
  std::vector<flaxstream::RowChunk> chunks;
  int64_t rows, in;
};

#if defined(FLAXSTREAM_AVX512)

constexpr int kBytes = 64;  // a vector
constexpr int kGroup = 4;   // input rows per tile: 4 x 4 sums, 4 biases, 4 weights of 32
constexpr int kPrefetchTiles = 0;  // the hardware's prefetching keeps up (memory speed on Intel)
using Bytes = __m512i;
using Sums = __m512i;

inline uint8_t stored(int8_t q) { return static_cast<uint8_t>(q) ^ 0x80; }
inline Sums zero_sums() { return _mm512_setzero_si512(); }
inline Bytes load(const void* p) { return _mm512_loadu_si512(p); }
// Plain loads for whole columns: masked byte loads cost several times more on some CPUs
// (AMD Zen 5: the 262144-row head 20 against 11.5 ms on one thread), so only the tail is
// masked.
inline Bytes load_first(const void* p, int64_t n) {
  return _mm512_maskz_loadu_epi8((1ULL << n) - 1, p);
}

struct Operand {  // one vector of weights
  Bytes w;
};
inline Operand operand(Bytes w) { return {w}; }
inline Sums dot(Sums acc, Bytes x, Operand w) { return _mm512_dpbusd_epi32(acc, x, w.w); }
// What the bias added: 128 * w, taken off each row's sums at the end.
inline Sums bias(Sums acc, Operand w) {
  return _mm512_dpbusd_epi32(acc, _mm512_set1_epi8(static_cast<char>(0x80)), w.w);
}
inline Sums sub(Sums a, Sums b) { return _mm512_sub_epi32(a, b); }

inline int32_t sum(Sums v) { return _mm512_reduce_add_epi32(v); }
// Four int32 sums, one per vector: [sum(v0), sum(v1), sum(v2), sum(v3)].
inline __m128i sum4(Sums v0, Sums v1, Sums v2, Sums v3) {
  const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  const __m512i c = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
  const __m256i d = _mm256_add_epi32(_mm512_castsi512_si256(c), _mm512_extracti64x4_epi64(c, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
}

#else  // AVX2 (simd.h has checked)

constexpr int kBytes = 32;
// One input row per tile: 4 sums and 4 weights with their magnitudes. Two rows (8 sums)
// spill out of the 16 registers: 2 rows took 1.4x longer than 1 row twice (AMD Zen 1).
constexpr int kGroup = 1;
// Each tile prefetches its rows' lines of the tile this far ahead into L1: on AMD Zen 1 the
// head on one thread took 42-50 ms without, 27 ms two tiles ahead and 21-26 ms four ahead.
constexpr int kPrefetchTiles = 4;
using Bytes = __m256i;
using Sums = __m256i;

inline uint8_t stored(int8_t q) { return static_cast<uint8_t>(q); }
inline Sums zero_sums() { return _mm256_setzero_si256(); }
inline Bytes load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline Bytes load_first(const void* p, int64_t n) {
  alignas(32) uint8_t part[kBytes] = {};
  std::memcpy(part, p, n);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
}

struct Operand {  // one vector of weights: their magnitudes, and w itself for the signs
  Bytes magnitude, w;
};
inline Operand operand(Bytes w) { return {_mm256_abs_epi8(w), w}; }
inline Sums dot(Sums acc, Bytes x, Operand w) {
  const __m256i pairs = _mm256_maddubs_epi16(w.magnitude, _mm256_sign_epi8(x, w.w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
inline Sums bias(Sums acc, Operand) { return acc; }  // no bias to take off
inline Sums sub(Sums a, Sums) { return a; }

inline int32_t sum(Sums v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}
inline __m128i sum4(Sums v0, Sums v1, Sums v2, Sums v3) {
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

#endif

// Row m of x rounded to int8 (in its stored form) with its scale, as _matmul_int8 rounds it.
void quantize_row(const float* x, int64_t in, uint8_t* xq, float* x_scale) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < in; ++i) {
    finite &= std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  if (!finite) {
    *x_scale = std::numeric_limits<float>::quiet_NaN();
    std::fill(xq, xq + in, stored(0));
    return;
  }
  const float scale = amax > 0.0f ? amax * (1.0f / 127.0f) : 1.0f;
  const float inverse = 1.0f / scale;
  *x_scale = scale;
  // nearbyint rounds half to even in the default rounding mode, as jnp.round does.
  for (int64_t i = 0; i < in; ++i)
    xq[i] = stored(static_cast<int8_t>(std::nearbyint(x[i] * inverse)));
}

// R weight rows (4, or 1 for a remainder) from row o of weight `wt`, times MR input rows
// (MR <= kGroup) from row m0. With the bias, acc[m][r] - bias[r] is
// sum_i (xq + 128) w - 128 w = sum_i xq w.
template <int R, int MR>
void tile(const Problem& p, const Weight& wt, int64_t o, int64_t m0, bool prefetch) {
  Sums acc[MR][R], biases[R];
  for (int r = 0; r < R; ++r) {
    biases[r] = zero_sums();
    for (int m = 0; m < MR; ++m) acc[m][r] = zero_sums();
  }
  const int64_t in = p.in;
  // One column of the R weight rows and the MR input rows; n < kBytes: the last, partial one.
  auto column = [&](int64_t i, int64_t n, auto partial) {
    if (kPrefetchTiles > 0 && prefetch && i % 64 == 0)  // a line per row
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(wt.w + (o + kPrefetchTiles * R + r) * in + i),
                     _MM_HINT_T0);
    Operand w[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* src = wt.w + (o + r) * in + i;
      w[r] = operand(partial ? load_first(src, n) : load(src));
      biases[r] = bias(biases[r], w[r]);
    }
    for (int m = 0; m < MR; ++m) {
      const uint8_t* src = p.x.data() + (m0 + m) * in + i;
      const Bytes xv = partial ? load_first(src, n) : load(src);
      for (int r = 0; r < R; ++r) acc[m][r] = dot(acc[m][r], xv, w[r]);
    }
  };
  int64_t i = 0;
  for (; i + kBytes <= in; i += kBytes) column(i, kBytes, std::false_type{});
  if (i < in) column(i, in - i, std::true_type{});
  for (int m = 0; m < MR; ++m) {
    float* dst = wt.out + (m0 + m) * wt.rows + o;
    const float xs = p.x_scale[m0 + m];
    if constexpr (R == 4) {
      const __m128i sums = sum4(sub(acc[m][0], biases[0]), sub(acc[m][1], biases[1]),
                                sub(acc[m][2], biases[2]), sub(acc[m][3], biases[3]));
      const __m128 y = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(sums), _mm_set1_ps(xs)),
                                  _mm_loadu_ps(wt.scale + o));
      _mm_storeu_ps(dst, y);
    } else {
      for (int r = 0; r < R; ++r)
        dst[r] = static_cast<float>(sum(sub(acc[m][r], biases[r]))) * xs * wt.scale[o + r];
    }
  }
}

// The input rows over the R weight rows at o; the first group prefetches (prefetch: the rows
// kPrefetchTiles tiles ahead are in the chunk).
template <int R>
void tiles(const Problem& p, const Weight& wt, int64_t o, bool prefetch) {
  int64_t m = 0;
  for (; m + kGroup <= p.rows; m += kGroup) tile<R, kGroup>(p, wt, o, m, prefetch && m == 0);
  prefetch = prefetch && m == 0;
  switch (p.rows - m) {
    case 3: if constexpr (kGroup > 3) tile<R, 3>(p, wt, o, m, prefetch); break;
    case 2: if constexpr (kGroup > 2) tile<R, 2>(p, wt, o, m, prefetch); break;
    case 1: tile<R, 1>(p, wt, o, m, prefetch); break;
  }
}

void run_chunk(const Problem& p, const flaxstream::RowChunk& c) {
  const Weight& wt = p.weights[c.weight];
  int64_t o = c.lo;
  for (; o + 4 <= c.hi; o += 4) tiles<4>(p, wt, o, o + 4 * (kPrefetchTiles + 1) <= c.hi);
  for (; o < c.hi; ++o) tiles<1>(p, wt, o, false);
}

ffi::Error Int8LinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::RemainingArgs weights, ffi::RemainingRets outs) {
  const auto xd = x.dimensions();
  const size_t n = outs.size();
  if (xd.size() != 2 || weights.size() != 2 * n)
    return ffi::Error::InvalidArgument(
        "int8_linear wants x [M, I], then (w [O, I] int8, scale [O] f32) per output");
  auto p = std::make_shared<Problem>();
  p->rows = xd[0], p->in = xd[1];
  int64_t total = 0;
  for (size_t j = 0; j < n; ++j) {
    auto w = weights.get<ffi::Buffer<ffi::S8>>(2 * j);
    auto s = weights.get<ffi::Buffer<ffi::F32>>(2 * j + 1);
    auto out = outs.get<ffi::Buffer<ffi::F32>>(j);
    if (!w.has_value() || !s.has_value() || !out.has_value())
      return ffi::Error::InvalidArgument("int8_linear: a weight, scale or output has the wrong type");
    const auto wd = w->dimensions(), sd = s->dimensions(), od = (*out)->dimensions();
    if (wd.size() != 2 || wd[1] != p->in || sd.size() != 1 || sd[0] != wd[0] ||
        od.size() != 2 || od[0] != p->rows || od[1] != wd[0])
      return ffi::Error::InvalidArgument(
          "int8_linear wants w [O, I], scale [O] and out [M, O] for x [M, I]");
    p->weights.push_back({w->typed_data(), s->typed_data(), (*out)->typed_data(), wd[0]});
    total += wd[0];
  }
  if (p->rows == 0 || total == 0) return ffi::Error::Success();
  p->x.resize(p->rows * p->in);
  p->x_scale.resize(p->rows);
  for (int64_t m = 0; m < p->rows; ++m)
    quantize_row(x.typed_data() + m * p->in, p->in, p->x.data() + m * p->in, &p->x_scale[m]);
  std::vector<int64_t> rows;
  for (const Weight& wt : p->weights) rows.push_back(wt.rows);
  p->chunks = flaxstream::RowChunks(rows, pool.num_threads(), 64);
  flaxstream::ParallelFor(pool, static_cast<int64_t>(p->chunks.size()),
                          [p](int64_t c) { run_chunk(*p, p->chunks[c]); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8Linear, Int8LinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
