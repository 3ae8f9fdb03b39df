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
// the weights at memory speed with AVX-512 VNNI. Its byte dot product (vpdpbusd)
// multiplies unsigned by signed bytes, so xq is biased by +128 (xq ^ 0x80 as a byte) and
// 128 * sum_i w[o, i] is taken off again. For I < 65536 both sums are exact in int32.
//
// A row holding NaN or an infinity gives NaN outputs (XLA's path gives garbage there too;
// NaN makes the step's finiteness check catch it).
//
// Threads: the weights' rows are cut into chunks, shared out by ParallelFor (parallel.h).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "parallel.h"
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
  std::vector<uint8_t> x;   // [M, I]: xq biased by +128
  std::vector<float> x_scale;  // [M]
  std::vector<Weight> weights;
  std::vector<flaxstream::RowChunk> chunks;
  int64_t rows, in;
};

inline __mmask64 tail_mask(int64_t n) { return n >= 64 ? ~0ULL : ((1ULL << n) - 1); }

// Four int32 sums, one per vector: [sum(v0), sum(v1), sum(v2), sum(v3)].
inline __m128i reduce4(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  const __m512i c = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
  const __m256i d = _mm256_add_epi32(_mm512_castsi512_si256(c), _mm512_extracti64x4_epi64(c, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
}

// Row m of x rounded to int8 (biased) with its scale, as _matmul_int8 rounds it.
void quantize_row(const float* x, int64_t in, uint8_t* xq, float* x_scale) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < in; ++i) {
    finite &= std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  if (!finite) {
    *x_scale = std::numeric_limits<float>::quiet_NaN();
    std::fill(xq, xq + in, 0x80);
    return;
  }
  const float scale = amax > 0.0f ? amax * (1.0f / 127.0f) : 1.0f;
  const float inverse = 1.0f / scale;
  *x_scale = scale;
  // nearbyint rounds half to even in the default rounding mode, as jnp.round does.
  for (int64_t i = 0; i < in; ++i)
    xq[i] = static_cast<uint8_t>(static_cast<int8_t>(std::nearbyint(x[i] * inverse))) ^ 0x80;
}

// R weight rows (4, or 1 for a remainder) from row o of weight `wt`, times MR input rows
// (MR <= 4) from row m0. acc[m][r] - bias[r] is sum_i (xq + 128) w - 128 w = sum_i xq w.
template <int R, int MR>
void tile(const Problem& p, const Weight& wt, int64_t o, int64_t m0) {
  __m512i acc[MR][R], bias[R];
  for (int r = 0; r < R; ++r) {
    bias[r] = _mm512_setzero_si512();
    for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_setzero_si512();
  }
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));  // 128 as an unsigned byte
  const int64_t in = p.in;
  // One 64-byte column of the R weight rows and the MR input rows. The full columns use
  // plain loads: masked byte loads cost several times more on some CPUs (AMD Zen 5: the
  // 262144-row head 20 against 11.5 ms on one thread), so only the tail is masked.
  auto column = [&](int64_t i, __mmask64 k, auto masked) {
    __m512i w[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* src = wt.w + (o + r) * in + i;
      w[r] = masked ? _mm512_maskz_loadu_epi8(k, src) : _mm512_loadu_si512(src);
      bias[r] = _mm512_dpbusd_epi32(bias[r], c128, w[r]);
    }
    for (int m = 0; m < MR; ++m) {
      const uint8_t* src = p.x.data() + (m0 + m) * in + i;
      const __m512i xv = masked ? _mm512_maskz_loadu_epi8(k, src) : _mm512_loadu_si512(src);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], xv, w[r]);
    }
  };
  int64_t i = 0;
  for (; i + 64 <= in; i += 64) column(i, 0, std::false_type{});
  if (i < in) column(i, tail_mask(in - i), std::true_type{});
  for (int m = 0; m < MR; ++m) {
    float* dst = wt.out + (m0 + m) * wt.rows + o;
    const float xs = p.x_scale[m0 + m];
    if constexpr (R == 4) {
      const __m128i sums = reduce4(
          _mm512_sub_epi32(acc[m][0], bias[0]), _mm512_sub_epi32(acc[m][1], bias[1]),
          _mm512_sub_epi32(acc[m][2], bias[2]), _mm512_sub_epi32(acc[m][3], bias[3]));
      const __m128 y = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(sums), _mm_set1_ps(xs)),
                                  _mm_loadu_ps(wt.scale + o));
      _mm_storeu_ps(dst, y);
    } else {
      for (int r = 0; r < R; ++r) {
        const int32_t sum = _mm512_reduce_add_epi32(_mm512_sub_epi32(acc[m][r], bias[r]));
        dst[r] = static_cast<float>(sum) * xs * wt.scale[o + r];
      }
    }
  }
}

template <int R>
void tiles(const Problem& p, const Weight& wt, int64_t o) {
  int64_t m = 0;
  for (; m + 4 <= p.rows; m += 4) tile<R, 4>(p, wt, o, m);
  switch (p.rows - m) {
    case 3: tile<R, 3>(p, wt, o, m); break;
    case 2: tile<R, 2>(p, wt, o, m); break;
    case 1: tile<R, 1>(p, wt, o, m); break;
  }
}

void run_chunk(const Problem& p, const flaxstream::RowChunk& c) {
  const Weight& wt = p.weights[c.weight];
  int64_t o = c.lo;
  for (; o + 4 <= c.hi; o += 4) tiles<4>(p, wt, o);
  for (; o < c.hi; ++o) tiles<1>(p, wt, o);
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
