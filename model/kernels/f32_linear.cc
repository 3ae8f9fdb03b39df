// Float32 linear layers for a few rows, as one XLA CPU custom call per input:
//
//   x [M, I] float32, then N weights w_j [O_j, I] float32 (output-major, as stored)
//   out_j [M, O_j] = sum_i x[m, i] * w_j[o, i]
//
// Why: a decode step of S slots multiplies S rows by every weight, and XLA CPU's matmul
// (YNNPACK) runs far below the machine's FMA rate for so few rows (Gemma 3 270M, 16 rows:
// ~90-100 GFLOP/s against ~250 at 128 rows; the 262144-row vocabulary head: ~60 ms for 16
// rows, while reading its 671 MB once takes ~23 ms). This loop keeps a tile of 4 weight
// rows in cache while every group of input rows (4 with AVX-512, 2 with AVX2) passes over
// it, so each weight byte comes from memory once per call and the FMA units stay busy; a
// wide input is cut into blocks that keep x in L1 (run_chunk).
// Written once for both instruction sets against simd.h.
//
// The sums are float32 in another order than XLA's, so results agree with XLA's path up
// to float32 rounding (tests/model/test_native.py).
//
// Threads: the weights' rows are cut into chunks, shared out by ParallelFor (parallel.h).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace simd = flaxstream::simd;

namespace {

struct Weight {
  const float* w;  // [rows, in]
  float* out;      // [M, rows]
  int64_t rows;
};

struct Problem {
  const float* x;  // [M, I]
  std::vector<Weight> weights;
  std::vector<flaxstream::RowChunk> chunks;
  int64_t rows, in;
};

// Input columns [lo, hi) of a block (run_chunk).
struct Columns {
  int64_t lo, hi;
};

// Input rows per group: R x G sums, R weight vectors and one input vector stay in registers
// (AVX-512: 4 x 4 + 4 + 1 of 32; AVX2: 4 x 2 + 4 + 1 of 16).
constexpr int kGroup = simd::kRegisters / 8;

// R weight rows (4, or 1 for a remainder) from row o of weight `wt`, times MR input rows
// (MR <= kGroup) from row m0, over the columns cols: with AVX-512 4 x 4 accumulators,
// 8 loads per 16 FMAs. The sums go to out, or are added to it after the first block of
// columns (run_chunk). Meanwhile weight rows pf_lo .. pf_lo + PF - 1 of the next tile are
// prefetched into L1, a line per 64-byte column (with AVX2 each line twice), so memory
// works while the FMAs do. Without prefetching, 16 rows of the head took about the sum of
// its memory and its compute time. On AMD Zen 5 the next tile into L1 beat two tiles ahead
// into L2 (the head at 16 rows: 20-21.5 against 23-24.5 ms, three alternating runs; at 2-8
// rows, where memory alone sets the pace, the two are the same). PF is a template
// argument: as a loop bound read at run time it cost the 4-row head ~10%.
template <int R, int MR, int PF>
void tile(const Problem& p, const Weight& wt, int64_t o, int64_t m0, int pf_lo, Columns cols) {
  simd::Floats acc[MR][R];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = simd::zero();
  const int64_t in = p.in;
  const float* ahead = wt.w + (o + R + pf_lo) * in;
  // n < kFloats: the last, partial column.
  auto column = [&](int64_t i, int64_t n, auto partial) {
    for (int r = 0; r < PF; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + r * in + i), _MM_HINT_T0);
    simd::Floats w[R];
    for (int r = 0; r < R; ++r) {
      const float* src = wt.w + (o + r) * in + i;
      w[r] = partial ? simd::load_first(src, n) : simd::load(src);
    }
    for (int m = 0; m < MR; ++m) {
      const float* src = p.x + (m0 + m) * in + i;
      const simd::Floats xv = partial ? simd::load_first(src, n) : simd::load(src);
      for (int r = 0; r < R; ++r) acc[m][r] = simd::fma(xv, w[r], acc[m][r]);
    }
  };
  int64_t i = cols.lo;
  for (; i + simd::kFloats <= cols.hi; i += simd::kFloats)
    column(i, simd::kFloats, std::false_type{});
  if (i < cols.hi) column(i, cols.hi - i, std::true_type{});
  for (int m = 0; m < MR; ++m) {
    float* dst = wt.out + (m0 + m) * wt.rows + o;
    if constexpr (R == 4) {
      __m128 sums = simd::sum4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
      if (cols.lo > 0) sums = _mm_add_ps(sums, _mm_loadu_ps(dst));
      _mm_storeu_ps(dst, sums);
    } else {
      for (int r = 0; r < R; ++r) dst[r] = (cols.lo > 0 ? dst[r] : 0.0f) + simd::sum(acc[m][r]);
    }
  }
}

template <int R, int MR>
void prefetching_tile(const Problem& p, const Weight& wt, int64_t o, int64_t m0, int lo, int n,
                      Columns cols) {
  switch (n) {  // at most R = 4 rows
    case 0: tile<R, MR, 0>(p, wt, o, m0, lo, cols); break;
    case 1: tile<R, MR, 1>(p, wt, o, m0, lo, cols); break;
    case 2: tile<R, MR, 2>(p, wt, o, m0, lo, cols); break;
    case 3: tile<R, MR, 3>(p, wt, o, m0, lo, cols); break;
    default: tile<R, MR, 4>(p, wt, o, m0, lo, cols); break;
  }
}

// Every group of (up to) kGroup input rows over the R weight rows at o. The groups share
// the prefetching of the next tile (none when that is past the chunk), a few rows each, so
// the requests are spread over the whole tile's time.
template <int R>
void tiles(const Problem& p, const Weight& wt, int64_t o, bool prefetch, Columns cols) {
  const int groups = static_cast<int>((p.rows + kGroup - 1) / kGroup);
  const int per_group = prefetch ? (R + groups - 1) / groups : 0;
  for (int g = 0; g < groups; ++g) {
    const int64_t m = kGroup * g;
    const int lo = std::min(R, g * per_group), n = std::min(R, lo + per_group) - lo;
    switch (std::min<int64_t>(p.rows - m, kGroup)) {
      case 4: if constexpr (kGroup >= 4) prefetching_tile<R, 4>(p, wt, o, m, lo, n, cols); break;
      case 3: if constexpr (kGroup >= 3) prefetching_tile<R, 3>(p, wt, o, m, lo, n, cols); break;
      case 2: prefetching_tile<R, 2>(p, wt, o, m, lo, n, cols); break;
      case 1: prefetching_tile<R, 1>(p, wt, o, m, lo, n, cols); break;
    }
  }
}

// The input columns in equal blocks of at most kBlockBytes of x: each block of x stays in L1
// while the chunk's weight tiles pass over it. With 16 rows of the down projection's 2048
// inputs, x is 128 KB, and a tile's groups fetched it again from L2 for every 4 weight rows
// (18 of those products, 640 x 2048 at 16 rows, weights from memory: 3.25-3.59 ms in three
// blocks against 4.34-4.43 in one, three alternating processes on AMD Zen 5).
constexpr int64_t kBlockBytes = 48 * 1024;

void run_chunk(const Problem& p, const flaxstream::RowChunk& c) {
  const Weight& wt = p.weights[c.weight];
  const int64_t x_bytes = p.rows * p.in * static_cast<int64_t>(sizeof(float));
  const int64_t blocks = (x_bytes + kBlockBytes - 1) / kBlockBytes;
  const int64_t width = ((p.in + blocks - 1) / blocks + simd::kFloats - 1) / simd::kFloats *
                        simd::kFloats;
  for (int64_t lo = 0; lo < p.in; lo += width) {
    const Columns cols{lo, std::min(p.in, lo + width)};
    int64_t o = c.lo;
    for (; o + 4 <= c.hi; o += 4) tiles<4>(p, wt, o, o + 8 <= c.hi, cols);
    for (; o < c.hi; ++o) tiles<1>(p, wt, o, false, cols);
  }
}

ffi::Error F32LinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::RemainingArgs weights, ffi::RemainingRets outs) {
  const auto xd = x.dimensions();
  const size_t n = outs.size();
  if (xd.size() != 2 || weights.size() != n)
    return ffi::Error::InvalidArgument("f32_linear wants x [M, I], then w [O, I] per output");
  auto p = std::make_shared<Problem>();
  p->x = x.typed_data(), p->rows = xd[0], p->in = xd[1];
  int64_t total = 0;
  for (size_t j = 0; j < n; ++j) {
    auto w = weights.get<ffi::Buffer<ffi::F32>>(j);
    auto out = outs.get<ffi::Buffer<ffi::F32>>(j);
    if (!w.has_value() || !out.has_value())
      return ffi::Error::InvalidArgument("f32_linear: a weight or output has the wrong type");
    const auto wd = w->dimensions(), od = (*out)->dimensions();
    if (wd.size() != 2 || wd[1] != p->in || od.size() != 2 || od[0] != p->rows ||
        od[1] != wd[0])
      return ffi::Error::InvalidArgument("f32_linear wants w [O, I] and out [M, O] for x [M, I]");
    p->weights.push_back({w->typed_data(), (*out)->typed_data(), wd[0]});
    total += wd[0];
  }
  if (p->rows == 0 || total == 0) return ffi::Error::Success();
  if (p->in == 0) {
    for (const Weight& wt : p->weights) std::fill(wt.out, wt.out + p->rows * wt.rows, 0.0f);
    return ffi::Error::Success();
  }
  std::vector<int64_t> rows;
  for (const Weight& wt : p->weights) rows.push_back(wt.rows);
  p->chunks = flaxstream::RowChunks(rows, pool.num_threads(), 32);
  flaxstream::ParallelFor(pool, static_cast<int64_t>(p->chunks.size()),
                          [p](int64_t c) { run_chunk(*p, p->chunks[c]); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(F32Linear, F32LinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
