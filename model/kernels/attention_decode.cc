// One decode step's attention over the KV cache, as an XLA CPU custom call.
//
//   q [B, K, G, H]   the step's queries (scaled, rotated), G query heads per kv head
//   k, v [B, C, K, H] a layer's cache: a ring of capacity C, the step's key already written
//   last [B] int32    the last position written per row (-1: nothing yet)
//   q_pos [B] int32   the query's position per row
//   window (attribute) keys a query may see, counting itself; 0 for a global layer
//   out [B, K, G, H]  softmax(q k^T) v over the row's valid keys (0 where there are none)
//
// Index i of the ring holds position kpos(i) = last - ((last - i) mod C); a key counts when
// 0 <= kpos <= q_pos and, with a window, q_pos - kpos < window (model/attention.py says why).
// Only the filled part of the ring, min(last + 1, C) entries, is read, and in place.
//
// Why: XLA CPU runs this as a loop over cache blocks that copies each block it reads and
// hands two tiny products per block to its matmul library (~50 us a call): ~3.5 ms of a
// Gemma 3 270M step at batch 1. Here a step reads only the filled positions, once.
//
// Threads: work items are (row, kv head, slice of the filled positions), shared out by
// ParallelFor (parallel.h). When there are fewer (row, kv head) pairs than twice the
// threads, each pair's filled positions are cut into slices of at least kMinSlice, so that
// one row's 8192 positions do not fall to one thread; each slice keeps its own softmax max
// and sum, and the caller merges the slices at the end.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace simd = flaxstream::simd;

namespace {

struct Problem {
  const float *q, *k, *v;
  const int32_t *last, *q_pos;
  float* out;
  int64_t rows, cap, kv_heads, group, dim, window, slices;
  std::vector<float> partial;  // per item: G maxima, G sums, G x H unnormalised outputs

  int64_t items() const { return rows * kv_heads * slices; }
  int64_t partial_size() const { return group * (dim + 2); }
};

constexpr int64_t kMinSlice = 256;  // positions; shorter slices cost more to merge than to read

// The G scores of one key: G independent accumulators, so the FMAs do not wait on each
// other (one dot at a time is bound by the FMA latency, ~4x slower at G = 4).
template <int G>
inline void dots(const float* q, const float* key, int64_t H, float* out) {
  simd::Floats acc[G];
  for (int g = 0; g < G; ++g) acc[g] = simd::zero();
  int64_t i = 0;
  for (; i + simd::kFloats <= H; i += simd::kFloats) {
    const simd::Floats kv = simd::load(key + i);
    for (int g = 0; g < G; ++g) acc[g] = simd::fma(simd::load(q + g * H + i), kv, acc[g]);
  }
  for (int g = 0; g < G; ++g) {
    float s = simd::sum(acc[g]);
    for (int64_t j = i; j < H; ++j) s += q[g * H + j] * key[j];
    out[g] = s;
  }
}

void dots_any(const float* q, const float* key, int64_t G, int64_t H, float* out) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) dots<4>(q + g * H, key, H, out + g);
  for (; g < G; ++g) dots<1>(q + g * H, key, H, out + g);
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
  const simd::Floats wv = simd::splat(w);
  int64_t i = 0;
  for (; i + simd::kFloats <= n; i += simd::kFloats)
    simd::store(y + i, simd::fma(wv, simd::load(x + i), simd::load(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
}

inline int64_t filled(const Problem& p, int64_t b) {
  return std::max<int64_t>(0, std::min<int64_t>(p.last[b] + 1, p.cap));
}

// One slice of row b's filled indexes for kv head kh: all G query heads of the group share
// each key and value read. Writes the slice's maxima, sums and unnormalised outputs.
void attend_slice(const Problem& p, int64_t b, int64_t kh, int64_t slice, float* part) {
  const int64_t C = p.cap, K = p.kv_heads, G = p.group, H = p.dim;
  const int64_t last = p.last[b], qp = p.q_pos[b], n = filled(p, b);
  const int64_t lo = n * slice / p.slices, hi = n * (slice + 1) / p.slices;
  float *m = part, *l = part + G, *acc = part + 2 * G;
  std::fill(m, m + G, -INFINITY);
  std::fill(l, l + G, 0.0f);
  std::fill(acc, acc + G * H, 0.0f);
  const float* q = p.q + (b * K + kh) * G * H;
  std::vector<float> s((hi - lo) * G);  // scores [hi - lo, G] of the visible keys
  std::vector<char> visible(hi - lo, 0);
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t kpos = last - ((last - i) % C + C) % C;
    if (kpos < 0 || kpos > qp || (p.window > 0 && qp - kpos >= p.window)) continue;
    visible[i - lo] = 1;
    float* row = s.data() + (i - lo) * G;
    dots_any(q, p.k + ((b * C + i) * K + kh) * H, G, H, row);
    for (int64_t g = 0; g < G; ++g) m[g] = std::max(m[g], row[g]);
  }
  for (int64_t i = lo; i < hi; ++i) {
    if (!visible[i - lo]) continue;
    const float* row = s.data() + (i - lo) * G;
    const float* value = p.v + ((b * C + i) * K + kh) * H;
    for (int64_t g = 0; g < G; ++g) {
      const float e = std::exp(row[g] - m[g]);
      l[g] += e;
      axpy(e, value, acc + g * H, H);
    }
  }
}

// out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s over the slices; 0 with no key.
void merge(const Problem& p, int64_t b, int64_t kh) {
  const int64_t G = p.group, H = p.dim, S = p.slices;
  const float* first = p.partial.data() + ((b * p.kv_heads + kh) * S) * p.partial_size();
  float* out = p.out + (b * p.kv_heads + kh) * G * H;
  for (int64_t g = 0; g < G; ++g) {
    float top = -INFINITY;
    for (int64_t sl = 0; sl < S; ++sl) top = std::max(top, first[sl * p.partial_size() + g]);
    float* o = out + g * H;
    std::fill(o, o + H, 0.0f);
    if (top == -INFINITY) continue;  // no visible key: 0, as in XLA's loop
    float total = 0.0f;
    for (int64_t sl = 0; sl < S; ++sl) {
      const float* part = first + sl * p.partial_size();
      if (part[g] == -INFINITY) continue;  // no visible key in this slice
      const float w = std::exp(part[g] - top);
      total += w * part[G + g];
      axpy(w, part + 2 * G + g * H, o, H);
    }
    const float inv = 1.0f / total;
    for (int64_t h = 0; h < H; ++h) o[h] *= inv;
  }
}

void run_item(Problem& p, int64_t t) {
  const int64_t slice = t % p.slices, pair = t / p.slices;
  attend_slice(p, pair / p.kv_heads, pair % p.kv_heads, slice,
               p.partial.data() + t * p.partial_size());
}

ffi::Error AttendDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> last,
                            ffi::Buffer<ffi::S32> q_pos, ffi::ResultBuffer<ffi::F32> out,
                            int64_t window) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || !(v.dimensions() == kd) || kd[0] != qd[0] ||
      kd[2] != qd[1] || kd[3] != qd[3] || !(out->dimensions() == qd) ||
      static_cast<int64_t>(last.element_count()) != qd[0] ||
      static_cast<int64_t>(q_pos.element_count()) != qd[0])
    return ffi::Error::InvalidArgument(
        "attend_decode wants q [B,K,G,H], k and v [B,C,K,H], last and q_pos [B], out like q");
  auto p = std::make_shared<Problem>();
  p->q = q.typed_data(), p->k = k.typed_data(), p->v = v.typed_data();
  p->last = last.typed_data(), p->q_pos = q_pos.typed_data(), p->out = out->typed_data();
  p->rows = qd[0], p->kv_heads = qd[1], p->group = qd[2], p->dim = qd[3];
  p->cap = kd[1], p->window = window;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t longest = 0;
  for (int64_t b = 0; b < p->rows; ++b) longest = std::max(longest, filled(*p, b));
  // Slice only as far as it takes to give every thread a couple of items.
  const int64_t pairs = p->rows * p->kv_heads;
  if (pairs == 0) return ffi::Error::Success();
  p->slices = std::max<int64_t>(1, std::min((2 * threads + pairs - 1) / pairs, longest / kMinSlice));
  p->partial.resize(p->items() * p->partial_size());
  flaxstream::ParallelFor(pool, p->items(), [p](int64_t t) { run_item(*p, t); });
  for (int64_t pair = 0; pair < pairs; ++pair) merge(*p, pair / p->kv_heads, pair % p->kv_heads);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttendDecode, AttendDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));
