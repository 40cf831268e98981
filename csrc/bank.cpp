// Packed module bank: the CPU core behind prunepeft._C (see bank.hpp).
//
// Design trade-off of block_stats (the only hot loop here)
// --------------------------------------------------------
// Statistics must be reproducible: a pruning decision must not change with
// the number of threads. Floating-point sums are not associative, so the
// reduction order has to be a function of the segment table alone. We split
// every segment into fixed pieces of kChunk elements, let threads compute one
// set of double partial sums per piece (any thread, any order), and then
// reduce the partials per owner sequentially in piece order. The price is one
// 8-double partial per piece (pieces ~ segments + total / kChunk, ~2000 for a
// 10M-element bank) and a serial reduce over them: ~16k additions, negligible
// next to streaming the bank. Rejected: per-thread per-owner accumulators
// (the sums then depend on the partition, i.e. on n_threads), atomics
// (nondeterministic order), float accumulators (too lossy over 1e7 terms).
// Inside a piece four accumulator lanes break the add dependency chain; lanes
// are combined in a fixed order (measured: 8 lanes 25% slower, 2 lanes the
// same; the loop is bound by arithmetic throughput, not memory).
// Measured on a 2-core AMD EPYC VM, 10M-element bank (1862 segments), param +
// grad, median of 5: 10-11 ms on 1 thread, 6-10 ms on 2 (the VM was shared),
// vs 630 ms for the torch reference and 2 ms for numpy.copyto of the params;
// 22-26 ms with the AdaLoRA sens/unc update.

#include "bank.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>

namespace prunepeft {
namespace {

constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kI64Min = std::numeric_limits<int64_t>::min();

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::invalid_argument(os.str());
}

// a * b for a, b >= 0, or invalid_argument on int64 overflow.
int64_t mul_nonneg(int64_t a, int64_t b, const char* fn) {
  if (a != 0 && b > kI64Max / a) fail(fn, ": bank size overflows int64");
  return a * b;
}

// a + b for a, b >= 0, or invalid_argument on int64 overflow.
int64_t add_nonneg(int64_t a, int64_t b, const char* fn) {
  if (b > kI64Max - a) fail(fn, ": bank size overflows int64");
  return a + b;
}

void check_len(const char* fn, const char* name, int64_t got, int64_t want, const char* want_name) {
  if (got != want) fail(fn, ": ", name, " has ", got, " entries, expected ", want, " (", want_name, ")");
}

void validate_spec(const CandidateSpec& s, const char* fn) {
  const int64_t n = s.in_dim.size;
  if (n < 1) fail(fn, ": need at least one candidate (in_dim is empty)");
  check_len(fn, "out_dim", s.out_dim.size, n, "len(in_dim)");
  check_len(fn, "width", s.width.size, n, "len(in_dim)");
  check_len(fn, "block_size", s.block_size.size, n, "len(in_dim)");
  check_len(fn, "group", s.group.size, n, "len(in_dim)");
  check_len(fn, "has_bias", s.has_bias.size, n, "len(in_dim)");
  for (int64_t i = 0; i < n; ++i) {
    if (s.in_dim[i] < 1) fail(fn, ": in_dim[", i, "] = ", s.in_dim[i], " must be >= 1");
    if (s.out_dim[i] < 1) fail(fn, ": out_dim[", i, "] = ", s.out_dim[i], " must be >= 1");
    if (s.width[i] < 0) fail(fn, ": width[", i, "] = ", s.width[i], " must be >= 0");
    if (s.block_size[i] < 1) fail(fn, ": block_size[", i, "] = ", s.block_size[i], " must be >= 1");
    if (s.width[i] % s.block_size[i] != 0)
      fail(fn, ": width[", i, "] = ", s.width[i], " is not a multiple of block_size[", i,
           "] = ", s.block_size[i]);
    if (s.group[i] < 0) fail(fn, ": group[", i, "] = ", s.group[i], " must be >= 0");
  }
}

Plan make_plan_impl(const CandidateSpec& s, const char* fn) {
  validate_spec(s, fn);
  const int64_t n = s.in_dim.size;

  // Groups in order of first appearance, members in input order.
  std::unordered_map<int64_t, int64_t> slot;
  std::vector<std::vector<int64_t>> members;
  for (int64_t i = 0; i < n; ++i) {
    const auto [it, inserted] = slot.emplace(s.group[i], static_cast<int64_t>(members.size()));
    if (inserted) {
      members.emplace_back();
    } else {
      const int64_t first = members[static_cast<size_t>(it->second)].front();
      if (s.in_dim[i] != s.in_dim[first])
        fail(fn, ": in_dim[", i, "] = ", s.in_dim[i], " differs from in_dim[", first, "] = ",
             s.in_dim[first], " of candidate ", first, " in the same group ", s.group[i]);
    }
    members[static_cast<size_t>(it->second)].push_back(i);
  }

  Plan p;
  p.n_cand = n;
  p.n_groups = static_cast<int64_t>(members.size());
  p.cand.assign(static_cast<size_t>(n * kCandCols), -1);
  p.group.reserve(static_cast<size_t>(p.n_groups * kGroupCols));
  auto cand = [&](int64_t i, int64_t col) -> int64_t& {
    return p.cand[static_cast<size_t>(i * kCandCols + col)];
  };

  // Offsets and block numbering.
  int64_t cursor = 0;
  int64_t next_block = 0;
  for (const auto& mem : members) {
    const int64_t g_off = cursor;
    int64_t g_width = 0;
    for (const int64_t i : mem) {
      cand(i, 0) = cursor;
      cursor = add_nonneg(cursor, mul_nonneg(s.width[i], s.in_dim[i], fn), fn);
      g_width += s.width[i];  // <= cursor, cannot overflow
      cand(i, 4) = s.width[i];
      cand(i, 5) = s.width[i] / s.block_size[i];
      cand(i, 6) = next_block;
      cand(i, 7) = s.group[i];
      next_block += cand(i, 5);
    }
    for (const int64_t i : mem) {
      cand(i, 1) = cursor;
      cursor = add_nonneg(cursor, mul_nonneg(s.width[i], s.out_dim[i], fn), fn);
    }
    for (const int64_t i : mem) {
      if (!s.has_bias[i]) continue;
      cand(i, 2) = cursor;
      cursor = add_nonneg(cursor, s.width[i], fn);
    }
    for (const int64_t i : mem) {
      if (!s.has_bias[i] || s.width[i] == 0) continue;
      cand(i, 3) = cursor;
      cursor = add_nonneg(cursor, s.out_dim[i], fn);
    }
    const int64_t first = mem.front();
    p.group.insert(p.group.end(), {s.group[first], g_off, g_width, s.in_dim[first]});
  }
  p.total = cursor;
  p.n_blocks = next_block;

  // Block table.
  p.block.reserve(static_cast<size_t>(p.n_blocks * kBlockCols));
  for (const auto& mem : members) {
    for (const int64_t i : mem) {
      const int64_t bs = s.block_size[i];
      for (int64_t j = 0; j < cand(i, 5); ++j) p.block.insert(p.block.end(), {i, j * bs, bs});
    }
  }

  // Segment table, in layout order (same loop structure as the offsets).
  for (const auto& mem : members) {
    for (const int64_t i : mem) {
      const int64_t bs = s.block_size[i];
      const int64_t len = bs * s.in_dim[i];
      for (int64_t j = 0; j < cand(i, 5); ++j)
        p.seg.insert(p.seg.end(), {cand(i, 0) + j * len, len, cand(i, 6) + j});
    }
    for (const int64_t i : mem) {
      const int64_t bs = s.block_size[i];
      const int64_t len = bs * s.out_dim[i];
      for (int64_t j = 0; j < cand(i, 5); ++j)
        p.seg.insert(p.seg.end(), {cand(i, 1) + j * len, len, cand(i, 6) + j});
    }
    for (const int64_t i : mem) {
      if (!s.has_bias[i]) continue;
      const int64_t bs = s.block_size[i];
      for (int64_t j = 0; j < cand(i, 5); ++j)
        p.seg.insert(p.seg.end(), {cand(i, 2) + j * bs, bs, cand(i, 6) + j});
    }
    for (const int64_t i : mem) {
      if (cand(i, 3) < 0) continue;
      p.seg.insert(p.seg.end(), {cand(i, 3), s.out_dim[i], p.n_blocks + i});
    }
  }
  p.n_segs = static_cast<int64_t>(p.seg.size()) / kSegCols;
  return p;
}

// ---------------------------------------------------------------------------
// block_stats

struct Piece {
  int64_t offset;
  int64_t length;
  int64_t owner;
};

// Sums over one piece. kGrad: grad present; kSens: sens/unc present.
template <bool kGrad, bool kSens>
void piece_stats(const float* w, const float* g, float* sens, float* unc, int64_t len,
                 const StatsOptions& opt, double* out) {
  constexpr int kLanes = 4;  // a power of two
  static_assert((kLanes & (kLanes - 1)) == 0, "kLanes must be a power of two");
  double w2[kLanes] = {}, ag[kLanes] = {}, awg[kLanes] = {}, wg2[kLanes] = {}, su[kLanes] = {};
  int64_t zeros[kLanes] = {}, small[kLanes] = {};
  const double thr = opt.threshold;
  const double b1 = opt.beta1, c1 = 1.0 - opt.beta1;
  const double b2 = opt.beta2, c2 = 1.0 - opt.beta2;

  auto step = [&](int64_t k, int l) {
    const double wd = static_cast<double>(w[k]);
    const double gd = kGrad ? static_cast<double>(g[k]) : 0.0;
    const double wg = wd * gd;  // exact: a float*float product fits in a double
    w2[l] += wd * wd;
    ag[l] += std::fabs(gd);
    awg[l] += std::fabs(wg);
    wg2[l] += wg * wg;
    zeros[l] += (w[k] == 0.0f) ? 1 : 0;
    small[l] += (std::fabs(wd) < thr) ? 1 : 0;
    if constexpr (kSens) {
      const double imp = std::fabs(wg);
      const float s_new = static_cast<float>(b1 * static_cast<double>(sens[k]) + c1 * imp);
      const double dev = std::fabs(imp - static_cast<double>(s_new));
      const float u_new = static_cast<float>(b2 * static_cast<double>(unc[k]) + c2 * dev);
      sens[k] = s_new;
      unc[k] = u_new;
      su[l] += static_cast<double>(s_new) * static_cast<double>(u_new);
    }
  };

  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes)
    for (int l = 0; l < kLanes; ++l) step(k + l, l);
  for (; k < len; ++k) step(k, 0);

  // Fixed-order combination of the lanes (pairwise tree); counts are exact.
  auto fold = [](double* a) {
    for (int width = kLanes / 2; width > 0; width /= 2)
      for (int l = 0; l < width; ++l) a[l] += a[l + width];
    return a[0];
  };
  int64_t n_zero = 0, n_small = 0;
  for (int l = 0; l < kLanes; ++l) {
    n_zero += zeros[l];
    n_small += small[l];
  }
  out[0] = fold(w2);
  out[1] = fold(ag);
  out[2] = fold(awg);
  out[3] = fold(wg2);
  out[4] = static_cast<double>(n_zero);
  out[5] = static_cast<double>(n_small);
  out[6] = fold(su);
  out[7] = static_cast<double>(len);
}

void run_piece(const StatsInputs& in, const StatsOptions& opt, const Piece& pc, double* out) {
  const float* w = in.param.data + pc.offset;
  const float* g = in.grad.present() ? in.grad.data + pc.offset : nullptr;
  float* s = in.sens.present() ? in.sens.data + pc.offset : nullptr;
  float* u = in.unc.present() ? in.unc.data + pc.offset : nullptr;
  if (g && s) piece_stats<true, true>(w, g, s, u, pc.length, opt, out);
  else if (g) piece_stats<true, false>(w, g, s, u, pc.length, opt, out);
  else if (s) piece_stats<false, true>(w, g, s, u, pc.length, opt, out);
  else piece_stats<false, false>(w, g, s, u, pc.length, opt, out);
}

void validate_stats(const StatsInputs& in, const StatsOptions& opt, int64_t n_segs) {
  const char* fn = "block_stats";
  const int64_t total = in.param.size;
  if (in.grad.present() && in.grad.size != total)
    fail(fn, ": grad has ", in.grad.size, " elements, expected ", total, " (len(param))");
  if (in.n_owners < 0) fail(fn, ": n_owners = ", in.n_owners, " must be >= 0");
  if (in.seg.size % kSegCols != 0) fail(fn, ": seg must have 3 columns (offset, length, owner)");
  if (in.sens.present() != in.unc.present()) fail(fn, ": sens and unc must be given together");
  if (in.sens.present() && in.sens.size != total)
    fail(fn, ": sens has ", in.sens.size, " elements, expected ", total, " (len(param))");
  if (in.unc.present() && in.unc.size != total)
    fail(fn, ": unc has ", in.unc.size, " elements, expected ", total, " (len(param))");
  if (in.accum.present() && in.accum.size != in.n_owners * kStatCols)
    fail(fn, ": accum has ", in.accum.size, " elements, expected shape (n_owners, 8) = (",
         in.n_owners, ", 8)");
  if (std::isnan(opt.threshold)) fail(fn, ": threshold must not be NaN");
  if (!(opt.beta1 >= 0.0 && opt.beta1 <= 1.0)) fail(fn, ": beta1 = ", opt.beta1, " must be in [0, 1]");
  if (!(opt.beta2 >= 0.0 && opt.beta2 <= 1.0)) fail(fn, ": beta2 = ", opt.beta2, " must be in [0, 1]");
  if (std::isnan(opt.accum_beta) || opt.accum_beta > 1.0)
    fail(fn, ": accum_beta = ", opt.accum_beta, " must be < 0 (running sum) or in [0, 1] (EMA)");
  if (opt.n_threads < 0)
    fail(fn, ": n_threads = ", opt.n_threads, " must be >= 0 (0 = all hardware threads)");
  for (int64_t i = 0; i < n_segs; ++i) {
    const int64_t off = in.seg[3 * i], len = in.seg[3 * i + 1], own = in.seg[3 * i + 2];
    if (off < 0 || len < 0 || off > total || len > total - off)
      fail(fn, ": seg[", i, "] = (", off, ", ", len, ", ", own, ") lies outside param of ", total,
           " elements");
    if (own < 0 || own >= in.n_owners)
      fail(fn, ": seg[", i, "] owner = ", own, " is outside [0, n_owners = ", in.n_owners, ")");
  }
  if (in.sens.present()) {  // in-place updates need disjoint segments
    std::vector<int64_t> order;
    for (int64_t i = 0; i < n_segs; ++i)
      if (in.seg[3 * i + 1] > 0) order.push_back(i);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return in.seg[3 * a] != in.seg[3 * b] ? in.seg[3 * a] < in.seg[3 * b] : a < b;
    });
    for (size_t k = 1; k < order.size(); ++k) {
      const int64_t a = order[k - 1], b = order[k];
      if (in.seg[3 * b] < in.seg[3 * a] + in.seg[3 * a + 1])
        fail(fn, ": seg[", std::min(a, b), "] and seg[", std::max(a, b),
             "] overlap; in-place sens/unc updates need disjoint segments");
    }
  }
}

}  // namespace

Plan make_plan(const CandidateSpec& spec) { return make_plan_impl(spec, "plan"); }

Compaction compact(const CandidateSpec& spec, Span<uint8_t> keep) {
  const char* fn = "compact";
  const Plan old = make_plan_impl(spec, fn);
  check_len(fn, "keep", keep.size, old.n_blocks, "n_blocks of the current plan");
  const int64_t n = old.n_cand;
  auto oc = [&](int64_t i, int64_t col) { return old.cand[static_cast<size_t>(i * kCandCols + col)]; };

  std::vector<int64_t> new_width(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    int64_t kept = 0;
    for (int64_t b = oc(i, 6); b < oc(i, 6) + oc(i, 5); ++b) kept += keep[b] ? 1 : 0;
    new_width[static_cast<size_t>(i)] = kept * spec.block_size[i];
  }
  CandidateSpec new_spec = spec;
  new_spec.width = Span<int64_t>{new_width.data(), n};

  Compaction c;
  c.plan = make_plan_impl(new_spec, fn);
  const Plan& np = c.plan;
  auto nc = [&](int64_t i, int64_t col) { return np.cand[static_cast<size_t>(i * kCandCols + col)]; };
  c.gather.assign(static_cast<size_t>(np.total), -1);
  c.block_gather.assign(static_cast<size_t>(np.n_blocks), -1);

  auto copy_range = [&](int64_t dst, int64_t src, int64_t len) {
    for (int64_t t = 0; t < len; ++t) c.gather[static_cast<size_t>(dst + t)] = src + t;
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bs = spec.block_size[i], in_dim = spec.in_dim[i], out_dim = spec.out_dim[i];
    int64_t k = 0;  // index of the next kept block within the candidate
    for (int64_t j = 0; j < oc(i, 5); ++j) {
      const int64_t ob = oc(i, 6) + j;
      if (!keep[ob]) continue;
      c.block_gather[static_cast<size_t>(nc(i, 6) + k)] = ob;
      copy_range(nc(i, 0) + k * bs * in_dim, oc(i, 0) + j * bs * in_dim, bs * in_dim);
      copy_range(nc(i, 1) + k * bs * out_dim, oc(i, 1) + j * bs * out_dim, bs * out_dim);
      if (spec.has_bias[i]) copy_range(nc(i, 2) + k * bs, oc(i, 2) + j * bs, bs);
      ++k;
    }
    if (nc(i, 3) >= 0) copy_range(nc(i, 3), oc(i, 3), out_dim);
  }
  return c;
}

std::vector<double> block_stats(const StatsInputs& in, const StatsOptions& opt) {
  const int64_t n_segs = in.seg.size / kSegCols;
  validate_stats(in, opt, n_segs);

  // Fixed decomposition into pieces (independent of the thread count).
  std::vector<Piece> pieces;
  for (int64_t i = 0; i < n_segs; ++i) {
    const int64_t off = in.seg[3 * i], len = in.seg[3 * i + 1], own = in.seg[3 * i + 2];
    for (int64_t start = 0; start < len; start += kChunk)
      pieces.push_back({off + start, std::min(kChunk, len - start), own});
  }
  // Tasks: runs of consecutive pieces of >= kChunk elements in all, so that
  // tiny segments (biases) do not cost one atomic increment each.
  std::vector<size_t> task_begin;
  int64_t run = kChunk;
  for (size_t p = 0; p < pieces.size(); ++p) {
    if (run >= kChunk) {
      task_begin.push_back(p);
      run = 0;
    }
    run += pieces[p].length;
  }
  task_begin.push_back(pieces.size());
  const size_t n_tasks = task_begin.size() - 1;

  std::vector<double> partial(pieces.size() * kStatCols, 0.0);
  std::atomic<size_t> next{0};
  auto worker = [&]() {
    for (size_t t = next.fetch_add(1); t < n_tasks; t = next.fetch_add(1))
      for (size_t p = task_begin[t]; p < task_begin[t + 1]; ++p)
        run_piece(in, opt, pieces[p], partial.data() + p * kStatCols);
  };

  int64_t n_threads = opt.n_threads;
  if (n_threads == 0) n_threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  n_threads = std::min<int64_t>(n_threads, static_cast<int64_t>(n_tasks));
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(std::max<int64_t>(n_threads - 1, 0)));
  for (int64_t t = 1; t < n_threads; ++t) {
    try {
      pool.emplace_back(worker);
    } catch (const std::system_error&) {
      break;  // could not start another thread: the ones we have finish the work
    }
  }
  worker();
  for (auto& th : pool) th.join();

  // Ordered reduce: per owner, partials are added in piece order.
  std::vector<double> out(static_cast<size_t>(in.n_owners * kStatCols), 0.0);
  for (size_t p = 0; p < pieces.size(); ++p) {
    double* dst = out.data() + pieces[p].owner * kStatCols;
    const double* src = partial.data() + p * kStatCols;
    for (int64_t c = 0; c < kStatCols; ++c) dst[c] += src[c];
  }

  if (in.accum.present()) {
    const double b = opt.accum_beta, cb = 1.0 - opt.accum_beta;
    for (size_t k = 0; k < out.size(); ++k) {
      double& a = in.accum.data[k];
      a = b < 0.0 ? a + out[k] : b * a + cb * out[k];
    }
  }
  return out;
}

std::vector<int64_t> select_prune(const PruneInputs& in) {
  const char* fn = "select_prune";
  const int64_t m = in.scores.size, n_groups = in.group_extra.size;
  check_len(fn, "costs", in.costs.size, m, "len(scores)");
  check_len(fn, "group", in.group.size, m, "len(scores)");
  check_len(fn, "eligible", in.eligible.size, m, "len(scores)");
  for (int64_t i = 0; i < m; ++i) {
    if (in.costs[i] < 0) fail(fn, ": costs[", i, "] = ", in.costs[i], " must be >= 0");
    if (in.group[i] < 0 || in.group[i] >= n_groups)
      fail(fn, ": group[", i, "] = ", in.group[i], " is outside [0, len(group_extra) = ", n_groups, ")");
    if (in.eligible[i] && !std::isfinite(in.scores[i]))
      fail(fn, ": scores[", i, "] = ", in.scores[i], " is not finite (the item is eligible)");
  }
  for (int64_t g = 0; g < n_groups; ++g)
    if (in.group_extra[g] < 0) fail(fn, ": group_extra[", g, "] = ", in.group_extra[g], " must be >= 0");

  std::vector<int64_t> picked;
  int64_t current = in.current;
  if (current <= in.target) return picked;

  std::vector<int64_t> order;
  for (int64_t i = 0; i < m; ++i)
    if (in.eligible[i]) order.push_back(i);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return in.scores[a] != in.scores[b] ? in.scores[a] < in.scores[b] : a < b;
  });
  std::vector<int64_t> remaining(static_cast<size_t>(n_groups), 0);
  for (int64_t i = 0; i < m; ++i) ++remaining[static_cast<size_t>(in.group[i])];

  auto subtract = [&](int64_t amount) {
    if (current < kI64Min + amount) fail(fn, ": current minus the pruned costs overflows int64");
    current -= amount;
  };
  for (const int64_t i : order) {
    picked.push_back(i);
    subtract(in.costs[i]);
    const int64_t g = in.group[i];
    if (--remaining[static_cast<size_t>(g)] == 0) subtract(in.group_extra[g]);
    if (current <= in.target) break;
  }
  return picked;
}

}  // namespace prunepeft
