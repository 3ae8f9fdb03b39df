// A float32 linear layer whose weight is packed in blocks of 16 outputs, as one XLA CPU
// custom call:
//
//   x [M, I] float32, w [O16, I, 16] float32: w[b, i, l] is weight row 16 b + l at input i
//   out [M, O] = sum_i x[m, i] * w[o / 16, i, o % 16], for O <= 16 O16 (the rest is padding)
//
// Used for the vocabulary head (model/transformer.py: Embedder, layout "packed"), the
// largest read of a decode step. Why this layout: a block is 16 outputs side by side, so one
// vector load of weights feeds one FMA per input row, with x[m, i] broadcast and the sums
// of a block's outputs kept in 16 lanes of one register each. Nothing is summed across
// lanes at the end, no sum leaves its register, and the whole weight is read once, front to
// back. In the output-major layout [O, I] (f32_linear.cc) each output's dot product
// needs its own register and a horizontal sum, and 16 rows of the head ran below the
// memory's speed; here 16 rows keep up with it (AMD Zen 5, the 262144 x 640 head at 16
// rows, two threads, a C++ timing loop: 15-18 ms against 20-22 for f32_linear).
//
// The sums run in input order, one FMA after another; they agree with XLA's product up
// to float32 rounding (tests/model/test_native.py).
//
// Threads: the blocks are cut into chunks, shared out by ParallelFor (parallel.h).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace simd = flaxstream::simd;

namespace {

constexpr int64_t kBlock = 16;  // outputs per block: one AVX-512 vector, two AVX2 vectors
constexpr int kVectors = kBlock / simd::kFloats;
// While a block's first rows pass over it, the block this far ahead is prefetched into L1,
// one line per input (the rate the block is read at). On AMD Zen 5 1 to 4 blocks ahead were
// alike (15-18 ms for the head at 16 rows), 8 slower, none 33 ms.
constexpr int64_t kAhead = 2;

struct Problem {
  const float* x;    // [M, I]
  const float* w;    // [blocks, I, 16]
  float* out;        // [M, O]
  int64_t rows, in, outs, blocks;
  std::vector<flaxstream::RowChunk> chunks;
};

// Rows m0 .. m0 + MR - 1 of x times block b: MR x kVectors sums in registers.
template <int MR>
void block(const Problem& p, int64_t b, int64_t m0, bool prefetch) {
  simd::Floats acc[MR][kVectors];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < kVectors; ++v) acc[m][v] = simd::zero();
  const float* w = p.w + b * p.in * kBlock;
  const float* ahead = w + kAhead * p.in * kBlock;
  const float* x = p.x + m0 * p.in;
  for (int64_t i = 0; i < p.in; ++i) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(ahead + i * kBlock), _MM_HINT_T0);
    simd::Floats wv[kVectors];
    for (int v = 0; v < kVectors; ++v) wv[v] = simd::load(w + i * kBlock + v * simd::kFloats);
    for (int m = 0; m < MR; ++m) {
      const simd::Floats xv = simd::splat(x[m * p.in + i]);
      for (int v = 0; v < kVectors; ++v) acc[m][v] = simd::fma(xv, wv[v], acc[m][v]);
    }
  }
  const int64_t o = b * kBlock, valid = std::min(kBlock, p.outs - o);
  for (int m = 0; m < MR; ++m) {
    float* dst = p.out + (m0 + m) * p.outs + o;
    if (valid == kBlock) {
      for (int v = 0; v < kVectors; ++v) simd::store(dst + v * simd::kFloats, acc[m][v]);
    } else {  // the last block of an O that is not a multiple of 16
      alignas(64) float sums[kBlock];
      for (int v = 0; v < kVectors; ++v) simd::store(sums + v * simd::kFloats, acc[m][v]);
      std::copy(sums, sums + valid, dst);
    }
  }
}

// Rows per pass at most: MR x kVectors sums, the block's kVectors weights and one x must fit
// in the registers (AVX-512: 16 + 1 + 1 of 32; AVX2, two vectors a block: 4 x 2 + 2 + 1 of
// 16).
constexpr int kMaxPass = simd::kRegisters >= 32 ? 16 : 4;

// Every row over block b, kMaxPass at a time and then the rest in passes of 8, 4, 2 and 1.
// The first pass reads the block from memory; later passes find it in L1 or L2.
void rows_over_block(const Problem& p, int64_t b, bool prefetch) {
  int64_t m = 0;
  for (; m + kMaxPass <= p.rows; m += kMaxPass) block<kMaxPass>(p, b, m, prefetch && m == 0);
  for (int pass : {8, 4, 2, 1}) {
    if (pass >= kMaxPass || p.rows - m < pass) continue;
    const bool first = prefetch && m == 0;
    switch (pass) {
      case 8: block<8>(p, b, m, first); break;
      case 4: block<4>(p, b, m, first); break;
      case 2: block<2>(p, b, m, first); break;
      default: block<1>(p, b, m, first); break;
    }
    m += pass;
  }
}

void run_chunk(const Problem& p, const flaxstream::RowChunk& c) {
  for (int64_t b = c.lo; b < c.hi; ++b) rows_over_block(p, b, b + kAhead < c.hi);
}

ffi::Error F32PackedLinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kBlock || wd[1] != xd[1] ||
      od.size() != 2 || od[0] != xd[0] || od[1] > wd[0] * kBlock ||
      od[1] <= (wd[0] - 1) * kBlock)
    return ffi::Error::InvalidArgument(
        "f32_packed_linear wants x [M, I], w [ceil(O / 16), I, 16] and out [M, O]");
  auto p = std::make_shared<Problem>();
  p->x = x.typed_data(), p->w = w.typed_data(), p->out = out->typed_data();
  p->rows = xd[0], p->in = xd[1], p->outs = od[1], p->blocks = wd[0];
  if (p->rows == 0 || p->outs == 0) return ffi::Error::Success();
  p->chunks = flaxstream::RowChunks({p->blocks}, pool.num_threads(), 8);
  flaxstream::ParallelFor(pool, static_cast<int64_t>(p->chunks.size()),
                          [p](int64_t c) { run_chunk(*p, p->chunks[c]); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(F32PackedLinear, F32PackedLinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
