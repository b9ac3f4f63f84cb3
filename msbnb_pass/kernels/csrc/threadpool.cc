// A small persistent thread pool for the kernels.
//
// MindSpore runs its own thread pool; on a 2-core machine two busy pools fight. This one is sized by
// set_num_threads() (default chosen by the Python side), lets its workers spin for a short while after a
// job (MSBNB_SPIN_US, default 50 us) so that the next kernel of a compiled graph finds them awake, then
// parks them on a condition variable; it runs nested or concurrent calls serially in the caller instead
// of queueing, and never outlives a call: a parallel_for returns only when every task is done.
//
// Why the spin: waking a parked thread costs tens of microseconds on a virtual machine, and a compiled
// decoder calls a kernel right after the previous op, so a parked worker joins each call late. Measured on
// the 2-core VM (tools/bench_kernels.py --sections stack, 48 layers of 4096x4096 NF4 at M = 1, two runs
// each): 0.68 / 0.74 ms per layer without the spin, 0.59 / 0.48 ms with it.
// The decode-step kernels (decode.cc) ask for a longer spin (SpinHint, 300 us) for the jobs they publish: in
// the lean step nearly every op is ours and MindSpore's dispatch between two layers can exceed 50 us, while
// in graphs that interleave MindSpore's own multi-threaded ops a long spin takes a core from them. SmolLM2 nf4
// decode on the Intel VM, tokens/s over three runs: spin 0: 66; 50 us: 73-77; 300 us: 77-82 (and the plain
// MindSpore-ops step 26-27 at 50-300 us, 16 at 1000 us). MSBNB_SPIN_US, when set, applies to every job.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "msbnb.h"

namespace msbnb {
namespace {

thread_local int t_spin_hint = 0;  // SpinHint: the spin after jobs this thread publishes (0: the default)

struct Job {
  void (*fn)(void *, int64_t) = nullptr;
  void *ctx = nullptr;
  int64_t ntasks = 0;
  int spin_us = 0;  // how long workers spin for the next job after this one
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
    quit_flag_.store(false, std::memory_order_relaxed);
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { worker(); });
    nworkers_.store((int)workers_.size(), std::memory_order_relaxed);
    size_ = n < 1 ? 1 : n;
  }
  int size() const { return size_; }
  // Whether there are workers and none is parked: each is working or spinning for the next job, so a hand-off
  // costs about a microsecond instead of a wake-up.
  bool all_awake() const {
    return nworkers_.load(std::memory_order_relaxed) > 0 && parked_.load(std::memory_order_relaxed) == 0;
  }

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
      job_.spin_us = t_spin_hint > 0 && env_spin_us_ < 0 ? t_spin_hint : spin_us_;
      job_.next.store(0, std::memory_order_relaxed);
      job_.done.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
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
    int spin = spin_us_;
    for (;;) {
      spin_for_job(seen, spin);
      {
        std::unique_lock<std::mutex> g(mutex_);
        parked_.fetch_add(1, std::memory_order_relaxed);
        cv_.wait(g, [&] { return quit_ || generation_.load(std::memory_order_relaxed) != seen; });
        parked_.fetch_sub(1, std::memory_order_relaxed);
        if (quit_) return;
        seen = generation_.load(std::memory_order_relaxed);
        spin = job_.spin_us;
        active_.fetch_add(1, std::memory_order_acq_rel);
      }
      work();
      active_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  // Busy-wait up to spin_us for a new job (or quit) before the caller parks on the condition variable.
  void spin_for_job(uint64_t seen, int spin_us) const {
    if (spin_us <= 0) return;
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
    int polls = 0;
    while (generation_.load(std::memory_order_acquire) == seen && !quit_flag_.load(std::memory_order_relaxed)) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if (++polls % 64 == 0 && std::chrono::steady_clock::now() >= until) return;
    }
  }

  // MSBNB_SPIN_US in microseconds, clamped to [0, 100000]; -1 when it is not set.
  static int spin_from_env() {
    const char *v = std::getenv("MSBNB_SPIN_US");
    if (!v || !*v) return -1;
    const long n = std::strtol(v, nullptr, 10);
    return n < 0 ? 0 : (n > 100000 ? 100000 : (int)n);
  }

  void stop() {
    quit_flag_.store(true, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> g(mutex_);
      quit_ = true;
    }
    cv_.notify_all();
    nworkers_.store(0, std::memory_order_relaxed);
    for (auto &t : workers_) t.join();
    workers_.clear();
    size_ = 1;
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_, run_mutex_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> active_{0};
  std::atomic<int> parked_{0};    // workers waiting on cv_
  std::atomic<int> nworkers_{0};  // workers_.size(), readable while the pool is resized
  bool quit_ = false;
  std::atomic<bool> quit_flag_{false};  // quit_ for the lock-free spin
  const int env_spin_us_ = spin_from_env();
  const int spin_us_ = env_spin_us_ < 0 ? 50 : env_spin_us_;
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

bool workers_awake() { return pool().all_awake(); }

SpinHint::SpinHint(int us) : previous_(t_spin_hint) { t_spin_hint = us; }
SpinHint::~SpinHint() { t_spin_hint = previous_; }

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
