// A persistent worker pool for the bank core (block_stats), header-only.
//
// Why: block_stats used to start a std::thread per helper on every call. A
// call on a small bank streams in tens of microseconds, about what starting
// and joining one thread costs, so extra threads could not pay off. The pool
// starts its threads once (lazily, on the first call that wants a helper)
// and parks them on a condition variable between calls.
//
// Protocol of one job (ThreadPool::run): the caller publishes the job,
// wakes `helpers` parked workers and runs the body itself. Workers that wake
// while the job is open join it (at most `helpers` of them); when the
// caller's own body returns it closes the job and waits only for the helpers
// that joined. A helper that was slow to wake (its core busy) finds the job
// closed and goes back to sleep, so the caller never waits for a thread that
// did no work. The body must therefore be a self-scheduling loop (an atomic
// task counter) that is correct for any number of participants; block_stats'
// results do not depend on who ran which task (see bank.cpp).
//
// Concurrency: one job at a time per pool. A second caller (another Python
// thread with the GIL released, or a body calling run) does not wait for the
// pool: try_lock fails and it runs its body alone on its own thread.
//
// Lifetime (shared_pool): the pool is created on first use with one worker
// per hardware thread minus the caller, and grows if a call asks for more
// helpers (n_threads above the hardware count). It is never destroyed
// while the process may still call it; a static object's destructor shuts it
// down (waits for a running job, stops and joins the workers; the object
// itself is leaked) at exit() or when the shared library is unloaded, and
// later calls run single-threaded.
//
// fork(): only the forking thread exists in the child, so the parent's
// workers are gone and the pool's mutexes may be held by threads that no
// longer exist. A pthread_atfork child handler forgets (leaks, by design)
// the parent's pool; the child's first parallel call creates a fresh one.
// The registry mutex is taken in the prepare handler and released in the
// parent and child handlers, so it is never copied in a locked state.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define PRUNEPEFT_HAVE_ATFORK 1
#endif

namespace prunepeft {
namespace detail {

class ThreadPool {
 public:
  using Body = void (*)(void*);

  explicit ThreadPool(int workers) { grow(workers); }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  ~ThreadPool() { stop(); }

  // Waits for a running job, then stops and joins every worker. Later run()
  // calls execute the body on the caller alone.
  void stop() {
    std::lock_guard<std::mutex> job(run_mu_);
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stop_) return;
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
    n_threads_ = 0;
  }

  // Number of worker threads (the caller not counted).
  int workers() const { return n_threads_; }

  // Runs body(ctx) on the calling thread and on up to `helpers` workers at
  // once; returns when every participant has returned. The first exception
  // (caller's first) is rethrown after all participants have finished.
  void run(int helpers, Body body, void* ctx) {
    std::unique_lock<std::mutex> job(run_mu_, std::try_to_lock);
    if (!job.owns_lock() || helpers <= 0 || stop_) {  // busy, nothing to share, or stopped
      body(ctx);
      return;
    }
    if (helpers > n_threads_) grow(helpers);
    helpers = std::min(helpers, n_threads_);
    {
      std::lock_guard<std::mutex> lk(mu_);
      body_ = body;
      ctx_ = ctx;
      wanted_ = helpers;
      joined_ = 0;
      open_ = true;
      error_ = nullptr;
      ++generation_;
    }
    if (helpers >= n_threads_) {
      wake_.notify_all();
    } else {
      for (int i = 0; i < helpers; ++i) wake_.notify_one();
    }
    std::exception_ptr own;
    try {
      body(ctx);
    } catch (...) {
      own = std::current_exception();
    }
    std::exception_ptr err;
    {
      std::unique_lock<std::mutex> lk(mu_);
      open_ = false;  // late wakers skip this job
      done_.wait(lk, [&] { return running_ == 0; });
      err = error_;
      error_ = nullptr;
    }
    if (own) std::rethrow_exception(own);
    if (err) std::rethrow_exception(err);
  }

 private:
  // Starts workers until there are `target` (fewer if the system refuses).
  // Called from the constructor or with run_mu_ held, i.e. never concurrently.
  void grow(int target) {
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen = generation_;
    }
    while (n_threads_ < target) {
      try {
        threads_.emplace_back([this, gen] { loop(gen); });
      } catch (const std::system_error&) {
        break;  // could not start another thread: the ones we have do the work
      }
      ++n_threads_;
    }
  }

  void loop(uint64_t seen) {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (!open_ || joined_ >= wanted_) continue;
      ++joined_;
      ++running_;
      const Body body = body_;
      void* const ctx = ctx_;
      lk.unlock();
      std::exception_ptr err;
      try {
        body(ctx);
      } catch (...) {
        err = std::current_exception();
      }
      lk.lock();
      if (err && !error_) error_ = err;
      if (--running_ == 0 && !open_) done_.notify_one();
    }
  }

  std::mutex run_mu_;  // held by the caller for the whole job: one job at a time
  std::mutex mu_;      // guards everything below
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  int n_threads_ = 0;
  uint64_t generation_ = 0;  // +1 per job: parked workers wake on a change
  bool open_ = false;        // the caller is still in the body: workers may join
  bool stop_ = false;
  int wanted_ = 0, joined_ = 0, running_ = 0;
  Body body_ = nullptr;
  void* ctx_ = nullptr;
  std::exception_ptr error_;
};

// The process-wide pool and its bookkeeping. Leaked on purpose (never
// destroyed), so that it stays valid for any caller during static destruction.
struct PoolRegistry {
  std::mutex mu;
  ThreadPool* pool = nullptr;
  bool shut_down = false;

  static PoolRegistry& get() {
    static PoolRegistry* r = [] {
      auto* reg = new PoolRegistry;
#ifdef PRUNEPEFT_HAVE_ATFORK
      pthread_atfork(&prepare_fork, &parent_after_fork, &child_after_fork);
#endif
      return reg;
    }();
    return *r;
  }

  static void prepare_fork() { get().mu.lock(); }
  static void parent_after_fork() { get().mu.unlock(); }
  static void child_after_fork() {
    PoolRegistry& r = get();
    r.pool = nullptr;  // its threads do not exist here: leak it, start afresh on demand
    r.mu.unlock();
  }
};

// The shared pool (created on first call), or nullptr after shutdown or
// when no thread could be started.
inline ThreadPool* shared_pool() {
  PoolRegistry& r = PoolRegistry::get();
  std::lock_guard<std::mutex> lk(r.mu);
  if (r.shut_down) return nullptr;
  if (!r.pool) {
    const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    auto* p = new ThreadPool(std::max(hw - 1, 1));
    if (p->workers() == 0) {
      delete p;
      return nullptr;
    }
    r.pool = p;
  }
  return r.pool;
}

// Shuts the shared pool down (for a static object's destructor: exit() or
// library unload). The object itself is leaked: a caller that fetched the
// pointer just before may still call run(), which then works alone.
inline void shutdown_shared_pool() {
  PoolRegistry& r = PoolRegistry::get();
  ThreadPool* p;
  {
    std::lock_guard<std::mutex> lk(r.mu);
    p = r.pool;
    r.shut_down = true;
  }
  if (p) p->stop();  // waits for a running job, joins the workers
}

// Runs f() on min(n_threads, ...) threads of the shared pool (the caller
// included); n_threads <= 1 runs f() on the caller only.
template <class F>
void parallel_run(int64_t n_threads, F& f) {
  ThreadPool* pool = n_threads > 1 ? shared_pool() : nullptr;
  if (!pool) {
    f();
    return;
  }
  const int helpers = static_cast<int>(std::min<int64_t>(n_threads - 1, 1024));
  pool->run(helpers, [](void* ctx) { (*static_cast<F*>(ctx))(); }, &f);
}

}  // namespace detail
}  // namespace prunepeft
