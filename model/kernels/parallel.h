// ParallelFor: run fn(0) .. fn(items - 1) on the calling thread and XLA's intra-op pool.
//
// Items are claimed from one atomic counter. The caller works too and then waits only for
// items someone has claimed, so it never depends on a pool task that has not started (the
// pool may be busy with other ops of the same program). A task that starts late finds the
// counter spent and returns; fn must hold (e.g. in a shared_ptr) whatever it reads, since
// such a task may run after ParallelFor has returned.

#ifndef FLAXSTREAM_KERNELS_PARALLEL_H_
#define FLAXSTREAM_KERNELS_PARALLEL_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace flaxstream {

struct Counters {
  alignas(64) std::atomic<int64_t> next{0};  // on its own cache line: every worker bumps it
  alignas(64) std::atomic<int64_t> done{0};
};

template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, F fn) {
  auto counters = std::make_shared<Counters>();
  auto work = [counters, fn, items] {
    for (int64_t t; (t = counters->next.fetch_add(1)) < items;) {
      fn(t);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), items);
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(work)(work));  // a copy each
  work();
  // Spin (the items in flight are short), but give the core away now and then: on two
  // cores another process may be the one holding it.
  for (int spins = 0; counters->done.load(std::memory_order_acquire) < items; ++spins) {
    if (spins % 1024 == 1023) std::this_thread::yield(); else _mm_pause();
  }
}

// Rows [lo, hi) of weight `weight`: the work items of the linear-layer kernels.
struct RowChunk {
  int64_t weight, lo, hi;
};

// Each weight's rows cut into chunks of a multiple of 4 rows (the kernels' tile): a few
// chunks per thread balance the load, and at least `min_rows` keeps the counter cold.
inline std::vector<RowChunk> RowChunks(const std::vector<int64_t>& rows, int64_t threads,
                                       int64_t min_rows) {
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  const int64_t per_thread = total / (8 * std::max<int64_t>(1, threads));
  const int64_t chunk = std::max<int64_t>(min_rows, (per_thread + 3) / 4 * 4);
  std::vector<RowChunk> chunks;
  for (int64_t j = 0; j < static_cast<int64_t>(rows.size()); ++j)
    for (int64_t lo = 0; lo < rows[j]; lo += chunk)
      chunks.push_back({j, lo, std::min(lo + chunk, rows[j])});
  return chunks;
}

}  // namespace flaxstream

#endif  // FLAXSTREAM_KERNELS_PARALLEL_H_
