// Unit tests of the bank core (csrc/bank.hpp): plan, compaction, block
// statistics and selection. Plain executable: prints failures and returns
// non-zero if any check failed (run by ctest).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <atomic>
#include <functional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bank.hpp"
#include "thread_pool.hpp"

#if defined(__linux__)
#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

namespace pp = prunepeft;

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond)                                                       \
  do {                                                                    \
    ++g_checks;                                                           \
    if (!(cond)) {                                                        \
      ++g_failures;                                                       \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                     \
  } while (0)

#define CHECK_EQ(a, b) CHECK((a) == (b))

// Expects fn() to throw std::invalid_argument whose message contains `needle`.
#define CHECK_THROWS(fn, needle)                                                      \
  do {                                                                                \
    ++g_checks;                                                                       \
    bool thrown_ = false;                                                             \
    try {                                                                             \
      fn();                                                                           \
    } catch (const std::invalid_argument& e_) {                                       \
      thrown_ = std::string(e_.what()).find(needle) != std::string::npos;             \
      if (!thrown_) std::fprintf(stderr, "  message was: %s\n", e_.what());           \
    }                                                                                 \
    if (!thrown_) {                                                                   \
      ++g_failures;                                                                   \
      std::fprintf(stderr, "%s:%d: expected invalid_argument mentioning '%s'\n",     \
                   __FILE__, __LINE__, needle);                                       \
    }                                                                                 \
  } while (0)

// Owns the arrays behind a CandidateSpec.
struct Cands {
  std::vector<int64_t> in_dim, out_dim, width, block_size, group;
  std::vector<uint8_t> has_bias;

  void add(int64_t in, int64_t out, int64_t w, int64_t bs, int64_t g, bool bias) {
    in_dim.push_back(in);
    out_dim.push_back(out);
    width.push_back(w);
    block_size.push_back(bs);
    group.push_back(g);
    has_bias.push_back(bias ? 1 : 0);
  }
  pp::CandidateSpec spec() const {
    auto s = [](const std::vector<int64_t>& v) { return pp::Span<int64_t>{v.data(), (int64_t)v.size()}; };
    return {s(in_dim), s(out_dim), s(width), s(block_size), s(group),
            pp::Span<uint8_t>{has_bias.data(), (int64_t)has_bias.size()}};
  }
};

static int64_t at(const std::vector<int64_t>& t, int64_t cols, int64_t r, int64_t c) {
  return t[static_cast<size_t>(r * cols + c)];
}

// Two groups: q and v share input 0 (group 7), o reads group 3; v has no bias,
// o has width 0 (pruned away).
static Cands example() {
  Cands c;
  c.add(/*in*/ 4, /*out*/ 3, /*w*/ 4, /*bs*/ 2, /*g*/ 7, true);   // q
  c.add(5, 2, 2, 1, 3, true);                                       // o
  c.add(4, 6, 2, 2, 7, false);                                      // v
  c.add(5, 2, 0, 2, 3, true);                                       // pruned
  return c;
}

static void test_plan_layout() {
  const Cands c = example();
  const pp::Plan p = pp::make_plan(c.spec());
  CHECK_EQ(p.n_cand, 4);
  // Group 7: D stack 6x4 = 24 @0, Ut(q) 4x3 @24, Ut(v) 2x6 @36, bd(q) 4 @48,
  // bu(q) 3 @52 -> 55. Group 3 @55: D(o) 2x5 @55, D(pruned) empty @65,
  // Ut(o) 2x2 @65, Ut(pruned) @69, bd(o) @69, bd(pruned) @71, bu(o) @71 -> 73.
  CHECK_EQ(p.total, 73);
  const std::vector<int64_t> cand = {
      0,  24, 48, 52, 4, 2, 0, 7,  // q
      55, 65, 69, 71, 2, 2, 3, 3,  // o
      16, 36, -1, -1, 2, 1, 2, 7,  // v
      65, 69, 71, -1, 0, 0, 5, 3,  // pruned
  };
  CHECK(p.cand == cand);
  CHECK_EQ(p.n_blocks, 5);
  const std::vector<int64_t> block = {0, 0, 2, 0, 2, 2, 2, 0, 2, 1, 0, 1, 1, 1, 1};
  CHECK(p.block == block);
  // Segments tile [0, total) in order; owners of bu segments are nb + cand.
  int64_t cursor = 0;
  for (int64_t s = 0; s < p.n_segs; ++s) {
    CHECK_EQ(at(p.seg, 3, s, 0), cursor);
    CHECK(at(p.seg, 3, s, 1) > 0);
    cursor += at(p.seg, 3, s, 1);
  }
  CHECK_EQ(cursor, p.total);
  // q: 2 blocks x (D, Ut, bd) + bu; v: 1 block x (D, Ut); o: 2 x 3 + bu.
  CHECK_EQ(p.n_segs, 7 + 2 + 7);
  CHECK_EQ(at(p.seg, 3, 0, 2), 0);              // D rows of q block 0
  CHECK_EQ(at(p.seg, 3, 2, 2), 2);              // D rows of v's block
  CHECK_EQ(at(p.seg, 3, 8, 0), 52);             // bu(q)
  CHECK_EQ(at(p.seg, 3, 8, 2), p.n_blocks + 0);
  CHECK_EQ(at(p.seg, 3, p.n_segs - 1, 2), p.n_blocks + 1);  // bu(o)
}

static void test_plan_errors() {
  {
    Cands c = example();
    c.width[1] = 3;  // block_size 1: fine
    c.width[2] = 3;  // block_size 2: not a multiple
    CHECK_THROWS([&] { pp::make_plan(c.spec()); }, "width[2]");
  }
  {
    Cands c = example();
    c.in_dim[2] = 9;
    CHECK_THROWS([&] { pp::make_plan(c.spec()); }, "in_dim[2]");
  }
  {
    Cands c = example();
    c.group[0] = -1;
    CHECK_THROWS([&] { pp::make_plan(c.spec()); }, "group[0]");
  }
  {
    Cands c = example();
    c.block_size[3] = 0;
    CHECK_THROWS([&] { pp::make_plan(c.spec()); }, "block_size[3]");
  }
  {
    Cands c = example();
    c.out_dim.pop_back();
    CHECK_THROWS([&] { pp::make_plan(c.spec()); }, "out_dim");
  }
  {
    Cands c;
    CHECK_THROWS([&] { pp::make_plan(c.spec()); }, "at least one");
  }
  {
    Cands c;
    c.add(int64_t{1} << 40, 1, int64_t{1} << 30, 1, 0, false);
    CHECK_THROWS([&] { pp::make_plan(c.spec()); }, "overflows");
  }
}

static void test_compact() {
  const Cands c = example();
  const pp::Plan old = pp::make_plan(c.spec());
  // Blocks: q0 q1 v0 o0 o1. Keep q1, drop v0 (v goes to width 0), keep o0 o1.
  const std::vector<uint8_t> keep = {0, 1, 0, 1, 1};
  const pp::Compaction r = pp::compact(c.spec(), pp::Span<uint8_t>{keep.data(), 5});
  CHECK_EQ(r.plan.n_blocks, 3);
  CHECK((r.block_gather == std::vector<int64_t>{1, 3, 4}));
  CHECK_EQ(at(r.plan.cand, 8, 0, 4), 2);  // q width 4 -> 2
  CHECK_EQ(at(r.plan.cand, 8, 2, 4), 0);  // v width 2 -> 0
  CHECK_EQ(at(r.plan.cand, 8, 1, 4), 2);  // o unchanged
  CHECK_EQ(static_cast<int64_t>(r.gather.size()), r.plan.total);

  // Fill the old bank with its own indices, gather, and check every region.
  std::vector<int64_t> old_flat(static_cast<size_t>(old.total));
  for (int64_t i = 0; i < old.total; ++i) old_flat[static_cast<size_t>(i)] = i;
  std::set<int64_t> seen(r.gather.begin(), r.gather.end());
  CHECK_EQ(static_cast<int64_t>(seen.size()), r.plan.total);  // injective
  auto new_at = [&](int64_t off) { return old_flat[static_cast<size_t>(r.gather[static_cast<size_t>(off)])]; };
  // q: D rows 2..3 of old (block 1), Ut rows 2..3, bd entries 2..3, bu whole.
  for (int64_t row = 0; row < 2; ++row) {
    for (int64_t k = 0; k < 4; ++k)
      CHECK_EQ(new_at(at(r.plan.cand, 8, 0, 0) + row * 4 + k), at(old.cand, 8, 0, 0) + (row + 2) * 4 + k);
    for (int64_t k = 0; k < 3; ++k)
      CHECK_EQ(new_at(at(r.plan.cand, 8, 0, 1) + row * 3 + k), at(old.cand, 8, 0, 1) + (row + 2) * 3 + k);
    CHECK_EQ(new_at(at(r.plan.cand, 8, 0, 2) + row), at(old.cand, 8, 0, 2) + row + 2);
  }
  for (int64_t k = 0; k < 3; ++k)
    CHECK_EQ(new_at(at(r.plan.cand, 8, 0, 3) + k), at(old.cand, 8, 0, 3) + k);
  // o: everything kept, bu too.
  for (int64_t k = 0; k < 2; ++k)
    CHECK_EQ(new_at(at(r.plan.cand, 8, 1, 3) + k), at(old.cand, 8, 1, 3) + k);
  // Same result as planning the new widths directly.
  Cands c2 = c;
  c2.width = {2, 2, 0, 0};
  const pp::Plan direct = pp::make_plan(c2.spec());
  CHECK(direct.cand == r.plan.cand);
  CHECK(direct.seg == r.plan.seg);
  CHECK_EQ(direct.total, r.plan.total);

  // Dropping every block of a biased candidate drops its bu.
  const std::vector<uint8_t> drop_o = {1, 1, 1, 0, 0};
  const pp::Compaction r2 = pp::compact(c.spec(), pp::Span<uint8_t>{drop_o.data(), 5});
  CHECK_EQ(at(r2.plan.cand, 8, 1, 3), -1);
  CHECK_EQ(r2.plan.total, old.total - (2 * 5 + 2 * 2 + 2 + 2));

  const std::vector<uint8_t> short_keep = {1, 1};
  CHECK_THROWS([&] { pp::compact(c.spec(), pp::Span<uint8_t>{short_keep.data(), 2}); }, "keep");
}

// Straightforward per-element reference of block_stats.
static std::vector<double> naive_stats(const std::vector<float>& w, const std::vector<float>* g,
                                       const std::vector<int64_t>& seg, int64_t n_owners, double thr,
                                       std::vector<float>* sens, std::vector<float>* unc, double b1,
                                       double b2) {
  std::vector<double> out(static_cast<size_t>(n_owners * 8), 0.0);
  for (size_t s = 0; s + 2 < seg.size(); s += 3) {
    double* o = out.data() + seg[s + 2] * 8;
    for (int64_t k = seg[s]; k < seg[s] + seg[s + 1]; ++k) {
      const double wd = w[static_cast<size_t>(k)];
      const double gd = g ? (*g)[static_cast<size_t>(k)] : 0.0;
      o[0] += wd * wd;
      o[1] += std::fabs(gd);
      o[2] += std::fabs(wd * gd);
      o[3] += (wd * gd) * (wd * gd);
      o[4] += wd == 0.0;
      o[5] += std::fabs(wd) < thr;
      if (sens) {
        float& sv = (*sens)[static_cast<size_t>(k)];
        float& uv = (*unc)[static_cast<size_t>(k)];
        const double imp = std::fabs(wd * gd);
        sv = static_cast<float>(b1 * sv + (1.0 - b1) * imp);
        uv = static_cast<float>(b2 * uv + (1.0 - b2) * std::fabs(imp - sv));
        o[6] += static_cast<double>(sv) * uv;
      }
      o[7] += 1;
    }
  }
  return out;
}

// block_stats sums float32 terms in float32 over runs of 64 per lane, then in
// double: relative error <= ~66 * 2^-24 = 3.9e-6 per sum of nonnegative terms.
static bool close(double a, double b) { return std::fabs(a - b) <= 1e-5 * std::fabs(b) + 1e-300; }

static void test_block_stats() {
  // Owners: 0 has a long segment (several pieces) plus a short one, 1 two
  // short ones, 2 nothing. Segments in non-layout order, with a gap.
  const int64_t total = 3 * pp::kChunk + 1000;
  const std::vector<int64_t> seg = {
      10, 2 * pp::kChunk + 17, 0,  //
      2 * pp::kChunk + 100, 7, 1,   //
      2 * pp::kChunk + 27, 3, 0,    //
      3 * pp::kChunk, 1000, 1,      //
  };
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> w(total), g(total), s0(total), u0(total);
  for (int64_t i = 0; i < total; ++i) {
    w[static_cast<size_t>(i)] = (i % 97 == 0) ? 0.f : nd(rng);
    g[static_cast<size_t>(i)] = nd(rng);
    s0[static_cast<size_t>(i)] = std::fabs(nd(rng));
    u0[static_cast<size_t>(i)] = std::fabs(nd(rng));
  }
  const double thr = 0.25;

  auto run = [&](bool with_grad, bool with_sens, int64_t threads, std::vector<float>& s,
                 std::vector<float>& u, bool portable = false) {
    pp::StatsInputs in;
    in.param = {w.data(), total};
    if (with_grad) in.grad = {g.data(), total};
    in.seg = {seg.data(), static_cast<int64_t>(seg.size())};
    in.n_owners = 3;
    if (with_sens) {
      in.sens = {s.data(), total};
      in.unc = {u.data(), total};
    }
    pp::StatsOptions opt;
    opt.threshold = thr;
    opt.n_threads = threads;
    opt.portable_kernel = portable;
    return pp::block_stats(in, opt);
  };

  for (const bool with_grad : {false, true}) {
    for (const bool with_sens : {false, true}) {
      std::vector<float> s_ref = s0, u_ref = u0;
      const auto ref = naive_stats(w, with_grad ? &g : nullptr, seg, 3, thr,
                                   with_sens ? &s_ref : nullptr, with_sens ? &u_ref : nullptr, 0.85, 0.85);
      std::vector<double> first;
      for (const int64_t threads : {1, 2, 3, 0}) {
        std::vector<float> s = s0, u = u0;
        const auto got = run(with_grad, with_sens, threads, s, u);
        CHECK_EQ(got.size(), ref.size());
        bool ok = true;
        for (size_t k = 0; k < ref.size(); ++k) ok = ok && close(got[k], ref[k]);
        CHECK(ok);
        if (with_sens) CHECK(s == s_ref && u == u_ref);  // same double ops -> same floats
        if (first.empty()) first = got;
        CHECK(got == first);  // bitwise identical for every thread count
      }
      {  // the portable kernel (non-x86, x86 without AVX2) gives the same bits as the SIMD one
        std::vector<float> s = s0, u = u0;
        CHECK(run(with_grad, with_sens, 2, s, u, /*portable=*/true) == first);
        if (with_sens) CHECK(s == s_ref && u == u_ref);
      }
      CHECK_EQ(first[2 * 8 + 7], 0.0);  // owner without segments
      CHECK_EQ(first[0 * 8 + 7], static_cast<double>(2 * pp::kChunk + 20));
      CHECK_EQ(first[1 * 8 + 7], 1007.0);
    }
  }

  // accum: running sum and EMA.
  {
    std::vector<double> accum(3 * 8, 1.0);
    pp::StatsInputs in;
    in.param = {w.data(), total};
    in.grad = {g.data(), total};
    in.seg = {seg.data(), static_cast<int64_t>(seg.size())};
    in.n_owners = 3;
    in.accum = {accum.data(), 24};
    pp::StatsOptions opt;
    opt.threshold = thr;
    const auto st = pp::block_stats(in, opt);
    bool ok = true;
    for (size_t k = 0; k < 24; ++k) ok = ok && accum[k] == 1.0 + st[k];
    CHECK(ok);
    opt.accum_beta = 0.5;
    std::vector<double> before = accum;
    pp::block_stats(in, opt);
    ok = true;
    for (size_t k = 0; k < 24; ++k) ok = ok && accum[k] == 0.5 * before[k] + 0.5 * st[k];
    CHECK(ok);
  }

  // Errors.
  {
    std::vector<float> s = s0, u = u0;
    const std::vector<int64_t> bad_owner = {0, 4, 3};
    const std::vector<int64_t> out_of_range = {total - 2, 4, 0};
    const std::vector<int64_t> overlap = {0, 10, 0, 5, 10, 1};
    auto call = [&](const std::vector<int64_t>& sg, bool with_sens, double accum_beta, int64_t threads) {
      std::vector<double> accum(24, 0.0);
      pp::StatsInputs in;
      in.param = {w.data(), total};
      in.seg = {sg.data(), static_cast<int64_t>(sg.size())};
      in.n_owners = 3;
      in.accum = {accum.data(), 24};
      if (with_sens) {
        in.sens = {s.data(), total};
        in.unc = {u.data(), total};
      }
      pp::StatsOptions opt;
      opt.accum_beta = accum_beta;
      opt.n_threads = threads;
      pp::block_stats(in, opt);
    };
    CHECK_THROWS([&] { call(bad_owner, false, -1, 0); }, "owner");
    CHECK_THROWS([&] { call(out_of_range, false, -1, 0); }, "seg[0]");
    CHECK_THROWS([&] { call(overlap, true, -1, 0); }, "overlap");
    call(overlap, false, -1, 0);  // overlap is fine without in-place state
    CHECK_THROWS([&] { call(seg, false, 1.5, 0); }, "accum_beta");
    CHECK_THROWS([&] { call(seg, false, -1, -1); }, "n_threads");
    pp::StatsInputs in;
    in.param = {w.data(), total};
    in.grad = {g.data(), total - 1};
    in.seg = {seg.data(), static_cast<int64_t>(seg.size())};
    in.n_owners = 3;
    CHECK_THROWS([&] { pp::block_stats(in, pp::StatsOptions{}); }, "grad");
  }
}

static void test_select_prune() {
  // Items: blocks of two candidates (groups 0, 1); group extras are biases.
  const std::vector<double> scores = {0.5, 0.1, 0.3, 0.1, 0.9};
  const std::vector<int64_t> costs = {10, 10, 10, 20, 20};
  const std::vector<int64_t> group = {0, 0, 0, 1, 1};
  const std::vector<int64_t> extra = {5, 7};
  std::vector<uint8_t> eligible = {1, 1, 1, 1, 1};
  auto run = [&](int64_t current, int64_t target) {
    pp::PruneInputs in;
    in.scores = {scores.data(), 5};
    in.costs = {costs.data(), 5};
    in.group = {group.data(), 5};
    in.group_extra = {extra.data(), 2};
    in.eligible = {eligible.data(), 5};
    in.current = current;
    in.target = target;
    return pp::select_prune(in);
  };
  // Order by (score, index): 1, 3, 2, 0, 4.
  CHECK((run(100, 100) == std::vector<int64_t>{}));
  CHECK((run(100, 95) == std::vector<int64_t>{1}));
  CHECK((run(100, 80) == std::vector<int64_t>{1, 3}));
  // 1, 3, 2 -> 60; 0 -> 50 and group 0 complete -> 45.
  CHECK((run(100, 45) == std::vector<int64_t>{1, 3, 2, 0}));
  CHECK((run(100, 0) == std::vector<int64_t>{1, 3, 2, 0, 4}));  // all, still above
  // An ineligible member blocks its group's extra.
  eligible = {0, 1, 1, 1, 1};
  CHECK((run(100, 46) == std::vector<int64_t>{1, 3, 2, 4}));
  std::vector<double> bad = scores;
  bad[2] = NAN;
  pp::PruneInputs in;
  in.scores = {bad.data(), 5};
  in.costs = {costs.data(), 5};
  in.group = {group.data(), 5};
  in.group_extra = {extra.data(), 2};
  in.eligible = {eligible.data(), 5};
  in.current = 100;
  CHECK_THROWS([&] { pp::select_prune(in); }, "scores[2]");
  eligible[2] = 0;  // a non-finite score of an ineligible item is ignored
  CHECK((pp::select_prune(in) == std::vector<int64_t>{1, 3, 4}));
  in.group_extra = {extra.data(), 1};
  CHECK_THROWS([&] { pp::select_prune(in); }, "group[3]");
}

// The pool protocol: every participant runs the body, the caller included;
// helpers beyond the request stay parked; exceptions reach the caller; a
// second caller while a job runs works alone; stop() joins and later jobs run
// on the caller.
static void test_thread_pool() {
  namespace d = pp::detail;
  d::ThreadPool pool(3);
  CHECK_EQ(pool.workers(), 3);
  struct Ctx {
    std::atomic<int> calls{0};
    std::atomic<int64_t> next{0}, sum{0};
  };
  auto body = [](void* p) {
    auto* c = static_cast<Ctx*>(p);
    ++c->calls;
    for (int64_t t = c->next.fetch_add(1); t < 100000; t = c->next.fetch_add(1)) c->sum += t;
  };
  for (int helpers : {0, 1, 2, 3, 5}) {  // 5: the pool grows
    Ctx c;
    pool.run(helpers, body, &c);
    CHECK_EQ(c.sum.load(), int64_t{100000} * 99999 / 2);
    CHECK(c.calls.load() >= 1 && c.calls.load() <= 1 + helpers);
  }
  CHECK_EQ(pool.workers(), 5);

  // Exceptions: a helper's or the caller's reaches the caller.
  struct Throw {
    std::atomic<int> calls{0};
  } th;
  bool thrown = false;
  try {
    pool.run(2, [](void* p) {
      if (static_cast<Throw*>(p)->calls++ >= 0) throw std::runtime_error("boom");
    }, &th);
  } catch (const std::runtime_error&) {
    thrown = true;
  }
  CHECK(thrown);

  // Nested run (a body calling run on the same pool): the inner call works alone.
  struct Nest {
    d::ThreadPool* pool;
    std::atomic<int> inner{0};
  } nest{&pool};
  pool.run(1, [](void* p) {
    auto* n = static_cast<Nest*>(p);
    n->pool->run(3, [](void* q) { ++*static_cast<std::atomic<int>*>(q); }, &n->inner);
  }, &nest);
  CHECK(nest.inner.load() >= 1 && nest.inner.load() <= 2);  // one inner job per participant

  // Concurrent callers from two threads: both complete with the right sum.
  {
    Ctx a, b;
    std::thread t([&] { for (int i = 0; i < 50; ++i) { a.next = 0; a.sum = 0; pool.run(2, body, &a); } });
    for (int i = 0; i < 50; ++i) {
      b.next = 0;
      b.sum = 0;
      pool.run(2, body, &b);
    }
    t.join();
    CHECK_EQ(a.sum.load(), int64_t{100000} * 99999 / 2);
    CHECK_EQ(b.sum.load(), int64_t{100000} * 99999 / 2);
  }

  pool.stop();
  CHECK_EQ(pool.workers(), 0);
  Ctx c;
  pool.run(2, body, &c);
  CHECK_EQ(c.calls.load(), 1);
  CHECK_EQ(c.sum.load(), int64_t{100000} * 99999 / 2);
}

#if defined(__linux__)
static int count_threads() {
  int n = 0;
  if (DIR* dir = opendir("/proc/self/task")) {
    while (const dirent* e = readdir(dir)) n += e->d_name[0] != '.';
    closedir(dir);
  }
  return n;
}

// block_stats reuses one pool (the thread count does not grow over many
// calls) and works in a fork()ed child of a process whose pool is running,
// even when the fork happens while another thread is inside block_stats.
static void test_shared_pool_reuse_and_fork() {
  const int64_t total = 5 * pp::kChunk + 123;
  std::vector<float> w(total), g(total);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t i = 0; i < total; ++i) {
    w[static_cast<size_t>(i)] = nd(rng);
    g[static_cast<size_t>(i)] = nd(rng);
  }
  const std::vector<int64_t> seg = {0, total, 0};
  auto stats = [&](int64_t threads) {
    pp::StatsInputs in;
    in.param = {w.data(), total};
    in.grad = {g.data(), total};
    in.seg = {seg.data(), 3};
    in.n_owners = 1;
    pp::StatsOptions opt;
    opt.threshold = 0.1;
    opt.n_threads = threads;
    return pp::block_stats(in, opt);
  };
  const auto want = stats(1);
  CHECK(stats(2) == want);  // creates the pool
  const int before = count_threads();
  bool same = true;
  for (int i = 0; i < 100; ++i) same = same && stats(i % 3 == 0 ? 0 : 2) == want;
  CHECK(same);
  CHECK_EQ(count_threads(), before);

  // fork from a quiet parent, then from one whose other thread keeps the pool busy.
  std::atomic<bool> busy{false}, quit{false};
  std::thread hammer;
  for (int round = 0; round < 4; ++round) {
    if (round == 1) {
      hammer = std::thread([&] {
        while (!quit) {
          stats(2);
          busy = true;
        }
      });
      while (!busy) std::this_thread::yield();
    }
    const pid_t pid = fork();
    if (pid == 0) {
      alarm(60);  // a deadlock ends as SIGALRM, not a hung test
      const bool ok = stats(2) == want && stats(3) == want;
      _exit(ok ? 0 : 3);
    }
    CHECK(pid > 0);
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  quit = true;
  hammer.join();
  CHECK(stats(2) == want);  // the parent's pool is unaffected
}
#endif

int main() {
  test_plan_layout();
  test_plan_errors();
  test_compact();
  test_block_stats();
  test_select_prune();
  test_thread_pool();
#if defined(__linux__)
  test_shared_pool_reuse_and_fork();
#endif
  std::printf("test_bank: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
