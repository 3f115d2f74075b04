// Parallel loop over work items on XLA's intra-op thread pool, shared by the native library's FFI handlers.
#ifndef RFLOW_NATIVE_PARALLEL_H_
#define RFLOW_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace rflow_native {

namespace ffi = xla::ffi;

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------------------------
// Parallel loop over work items on XLA's intra-op pool. The calling thread claims items too, and waits only for
// items that some running thread has claimed, so it finishes even if the pool is busy, has one thread, or never
// runs the helpers; helpers that start after the last item was claimed find nothing and exit. The shared state is
// reference-counted so such late helpers never touch the caller's (by then dead) stack.
// ---------------------------------------------------------------------------------------------------------------

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

struct Loop {
  int64_t total = 0;
  size_t scratch_floats = 0;
  std::function<void(int64_t, float*)> work;  // work(item, scratch): scratch is per participating thread.
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
};

inline void Participate(Loop& loop) {
  std::unique_ptr<float, FreeDeleter> scratch;
  int64_t finished = 0;
  for (int64_t i; (i = loop.next.fetch_add(1)) < loop.total;) {
    if (!scratch) {
      const size_t bytes = RoundUp(static_cast<int64_t>(loop.scratch_floats * sizeof(float)), 64);
      scratch.reset(static_cast<float*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64))));
    }
    loop.work(i, scratch.get());
    ++finished;
  }
  if (finished == 0) return;
  std::lock_guard<std::mutex> lock(loop.mu);
  loop.done += finished;
  if (loop.done == loop.total) loop.cv.notify_all();
}

inline void ParallelFor(ffi::ThreadPool& pool, int64_t total, size_t scratch_floats,
                 std::function<void(int64_t, float*)> work) {
  auto loop = std::make_shared<Loop>();
  loop->total = total;
  loop->scratch_floats = scratch_floats;
  loop->work = std::move(work);
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), total) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([loop] { Participate(*loop); });
  Participate(*loop);
  std::unique_lock<std::mutex> lock(loop->mu);
  loop->cv.wait(lock, [&] { return loop->done == loop->total; });
}

}  // namespace rflow_native

#endif  // RFLOW_NATIVE_PARALLEL_H_
