// int8 x int8 -> int32 matrix products for a few rows, as an XLA CPU custom call.
//
//   out[m, o] = sum_i x[m, i] * w[o, i]      x [M, I] int8, w [O, I] int8, out [M, O] int32
//
// Why: a decode step multiplies one row (or a few) by every weight. XLA CPU's own int8 path
// (YNNPACK) reads the weights at ~12 GB/s there; this loop streams them at memory speed.
// AVX-512 VNNI's dot product (vpdpbusd) multiplies unsigned by signed bytes, so x is
// biased by +128 (x ^ 0x80 as a byte) and 128 * sum_i w[o, i] is taken off again. For
// I < 65536 both sums are exact in int32, so the result equals the plain int32 product bit
// for bit (beyond that both wrap modulo 2^32, as XLA's int32 dot does).
//
// Threads: the output rows are cut into chunks, shared out by ParallelFor (parallel.h).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  std::vector<uint8_t> x;  // [M, I], biased by +128
  const int8_t* w;
  int32_t* out;
  int64_t rows, in, out_rows, chunk, num_chunks;
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

// R weight rows (4, or 1 for a remainder) times MR input rows (MR <= 4), from weight row o
// and input row m0. acc[m][r] - bias[r] is sum_i (x + 128) w - 128 w = sum_i x w.
template <int R, int MR>
void tile(const Problem& p, int64_t o, int64_t m0) {
  __m512i acc[MR][R], bias[R];
  for (int r = 0; r < R; ++r) {
    bias[r] = _mm512_setzero_si512();
    for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_setzero_si512();
  }
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));  // 128 as an unsigned byte
  const int64_t in = p.in;
  for (int64_t i = 0; i < in; i += 64) {
    const __mmask64 k = tail_mask(in - i);
    __m512i w[R];
    for (int r = 0; r < R; ++r) {
      w[r] = _mm512_maskz_loadu_epi8(k, p.w + (o + r) * in + i);
      bias[r] = _mm512_dpbusd_epi32(bias[r], c128, w[r]);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi8(k, p.x.data() + (m0 + m) * in + i);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], xv, w[r]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    int32_t* dst = p.out + (m0 + m) * p.out_rows + o;
    if constexpr (R == 4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                       reduce4(_mm512_sub_epi32(acc[m][0], bias[0]), _mm512_sub_epi32(acc[m][1], bias[1]),
                               _mm512_sub_epi32(acc[m][2], bias[2]), _mm512_sub_epi32(acc[m][3], bias[3])));
    } else {
      for (int r = 0; r < R; ++r) dst[r] = _mm512_reduce_add_epi32(_mm512_sub_epi32(acc[m][r], bias[r]));
    }
  }
}

template <int R>
void tiles(const Problem& p, int64_t o) {
  int64_t m = 0;
  for (; m + 4 <= p.rows; m += 4) tile<R, 4>(p, o, m);
  switch (p.rows - m) {
    case 3: tile<R, 3>(p, o, m); break;
    case 2: tile<R, 2>(p, o, m); break;
    case 1: tile<R, 1>(p, o, m); break;
  }
}

void run_chunk(const Problem& p, int64_t c) {
  const int64_t lo = c * p.chunk, hi = std::min(lo + p.chunk, p.out_rows);
  int64_t o = lo;
  for (; o + 4 <= hi; o += 4) tiles<4>(p, o);
  for (; o < hi; ++o) tiles<1>(p, o);
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                          ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || xd[1] != wd[1] ||
      od[0] != xd[0] || od[1] != wd[0])
    return ffi::Error::InvalidArgument("int8_matmul wants x [M, I], w [O, I] and out [M, O]");
  auto p = std::make_shared<Problem>();
  p->rows = xd[0], p->in = xd[1], p->out_rows = wd[0];
  p->w = w.typed_data();
  p->out = out->typed_data();
  p->x.resize(p->rows * p->in);
  const int8_t* xs = x.typed_data();
  for (int64_t i = 0; i < p->rows * p->in; ++i) p->x[i] = static_cast<uint8_t>(xs[i]) ^ 0x80;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // A few chunks per thread balances the load; at least 64 rows keeps the counter cold.
  p->chunk = std::max<int64_t>(64, (p->out_rows / (8 * threads) + 3) / 4 * 4);
  p->num_chunks = (p->out_rows + p->chunk - 1) / p->chunk;
  flaxstream::ParallelFor(pool, p->num_chunks, [p](int64_t c) { run_chunk(*p, c); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Int8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
