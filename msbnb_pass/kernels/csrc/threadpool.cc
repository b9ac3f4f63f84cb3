// A small persistent thread pool for the kernels.
//
// MindSpore runs its own thread pool; on a 2-core machine two busy pools fight. This one is sized by
// set_num_threads() (default chosen by the Python side), parks its workers on a condition variable
// after a short spin, runs nested or concurrent calls serially in the caller instead of queueing, and
// never outlives a call: a parallel_for returns only when every task is done.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "msbnb.h"

namespace msbnb {
namespace {

struct Job {
  void (*fn)(void *, int64_t) = nullptr;
  void *ctx = nullptr;
  int64_t ntasks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

class Pool {
 public:
  ~Pool() { stop(); }

  void resize(int n) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    stop();
    quit_ = false;
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { worker(); });
    size_ = n < 1 ? 1 : n;
  }
  int size() const { return size_; }

  void run(int64_t ntasks, void (*fn)(void *, int64_t), void *ctx) {
    std::unique_lock<std::mutex> run_lock(run_mutex_, std::try_to_lock);
    if (!run_lock.owns_lock() || in_task_ || workers_.empty()) {  // busy, nested or single-threaded
      for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t);
      return;
    }
    {
      // Publish the job only while no worker is inside work(): workers enter it holding this mutex.
      std::unique_lock<std::mutex> g(mutex_);
      while (active_.load(std::memory_order_acquire) != 0) {
        g.unlock();
        std::this_thread::yield();
        g.lock();
      }
      job_.fn = fn;
      job_.ctx = ctx;
      job_.ntasks = ntasks;
      job_.next.store(0, std::memory_order_relaxed);
      job_.done.store(0, std::memory_order_relaxed);
      generation_++;
    }
    cv_.notify_all();
    work();
    while (job_.done.load(std::memory_order_acquire) < ntasks) std::this_thread::yield();
  }

 private:
  void work() {
    in_task_ = true;
    for (;;) {
      int64_t t = job_.next.fetch_add(1, std::memory_order_relaxed);
      if (t >= job_.ntasks) break;
      job_.fn(job_.ctx, t);
      job_.done.fetch_add(1, std::memory_order_release);
    }
    in_task_ = false;
  }

  void worker() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> g(mutex_);
        cv_.wait(g, [&] { return quit_ || generation_ != seen; });
        if (quit_) return;
        seen = generation_;
        active_.fetch_add(1, std::memory_order_acq_rel);
      }
      work();
      active_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> g(mutex_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto &t : workers_) t.join();
    workers_.clear();
    size_ = 1;
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_, run_mutex_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;
  std::atomic<int> active_{0};
  bool quit_ = false;
  int size_ = 1;
  Job job_;
  static thread_local bool in_task_;
};

thread_local bool Pool::in_task_ = false;

Pool &pool() {
  static Pool *p = new Pool();  // never destroyed: workers must not be joined during static teardown
  return *p;
}

}  // namespace

int num_threads() { return pool().size(); }

void set_num_threads(int n) {
  if (n < 1) n = 1;
  if (n > 256) n = 256;
  if (n != pool().size()) pool().resize(n);
}

void parallel_for(int64_t ntasks, void (*fn)(void *, int64_t), void *ctx) { pool().run(ntasks, fn, ctx); }

void *scratch(int slot, size_t bytes) {
  struct Buf {
    void *p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  static thread_local Buf bufs[8];
  Buf &b = bufs[slot & 7];
  if (b.n < bytes) {
    std::free(b.p);
    size_t n = (bytes + 63) / 64 * 64;
    b.p = std::aligned_alloc(64, n);
    b.n = b.p ? n : 0;
  }
  return b.p;
}

}  // namespace msbnb
