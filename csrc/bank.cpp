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
// Rejected as well: summing every element in double (the previous kernel:
// exact products, but compute-bound at ~0.5 ns/element on 2 threads, 14 GB/s,
// 0.13x memcpy).
//
// Inside a piece (see "Summation scheme" below) columns 0-3 use float32
// products summed in float32 per lane (16 lanes) over runs of 1024 elements
// (64 terms per lane), each run then added into per-lane doubles; the lanes
// are folded by a fixed pairwise tree. Trade-off: a relative error of at most
// ~66 * 2^-24 = 3.9e-6 per sum (typically ~1e-8; tests allow 1e-5) and
// float32 range for the products (terms beyond ~1e19 overflow, below ~1e-38
// underflow), for a pass that runs near memory speed. Counts are exact; the
// AdaLoRA update stays in double exactly as in the reference (sens/unc bitwise
// equal), column 6 is summed in double. Kernels: AVX-512F, AVX2 (x86-64, chosen
// at run time via __builtin_cpu_supports, no -march flags) and a portable one
// (any ISA); all three execute the same operations per lane in the same order
// and give bitwise identical results (tested). Products must not fuse into
// FMAs: the build pins -ffp-contract=off; the SIMD vector bodies also block
// fusion with an asm barrier, the scalar code (portable kernel, tails) relies
// on the flag (checked: with -ffp-contract=fast the AVX-512 tails differ).
// Measured on a 2-core AMD EPYC (Zen 5) VM, bench/bench_scoring.py (1.92M
// elements, 1164 segments, 2 threads, median of 9; another process was
// using part of the second core):
//   param+grad (8 B/elem):  1.09 ms, 14 GB/s, 0.13x memcpy  ->  0.25-0.27 ms,
//                           57-63 GB/s, 0.57-0.60x memcpy (95-109 GB/s r+w)
//   + AdaLoRA (24 B/elem):  2.79 ms, 17 GB/s, 0.15x memcpy  ->  0.64-0.67 ms,
//                           69-72 GB/s, 0.64-0.76x memcpy
// Single thread, same bank (C++ harness, contended): 0.26 ms with AVX-512,
// 0.47 ms with AVX2, 0.89 ms portable, 2.7 ms before. (That bank fits in
// the 32 MiB L3: these are cache, not DRAM, figures.)
//
// Threads come from a persistent pool (thread_pool.hpp: started once, parked
// between calls, re-created in a fork()ed child), no longer a std::thread per
// call. The tasks are claimed through an atomic counter by whoever is
// running, so a helper that is late (its core busy) costs nothing.
// Out of cache, bench/bench_scoring.py on a Llama-7B-shaped bank of 18.2M
// elements (139 MiB of param+grad, 4.3x the LLC), same kind of VM but
// without AVX-512 (AVX2 kernel) and with both cores busy with other jobs
// (load average ~4), median of 21, copy = torch copy of the same bytes:
//   param+grad, 1 thread:   14.9 ms,  9.8 GB/s, 0.84x copy (11.7 GB/s r+w)
//   param+grad, 2 threads:  23.1 ms,  6.3 GB/s, 0.60x copy (10.6 GB/s r+w)
//   + AdaLoRA, 1 thread:    64.5 ms,  6.8 GB/s, 0.90x copy
//   + AdaLoRA, 2 threads:   75.4 ms,  5.8 GB/s, 0.91x copy
// One core already saturates this VM's DRAM; the second thread only adds
// waits for a preempted helper. Compute headroom (1 thread, CPU time, data
// in L3): ~22-25 GB/s plain, ~11-12 GB/s with AdaLoRA, whose float<->double
// conversions (8 per 4 elements) would become the limit on a machine whose
// single-core copy bandwidth exceeds ~20 GB/s.

#include "bank.hpp"
#include "thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace prunepeft {
namespace {

// Stops and joins the shared pool's workers at exit() or when the module is
// unloaded (see thread_pool.hpp).
struct PoolShutdown {
  ~PoolShutdown() { detail::shutdown_shared_pool(); }
} g_pool_shutdown;

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
  p.cand.assign(static_cast<size_t>(n * kCandCols), -1);
  auto cand = [&](int64_t i, int64_t col) -> int64_t& {
    return p.cand[static_cast<size_t>(i * kCandCols + col)];
  };

  // Offsets and block numbering.
  int64_t cursor = 0;
  int64_t next_block = 0;
  for (const auto& mem : members) {
    for (const int64_t i : mem) {
      cand(i, 0) = cursor;
      cursor = add_nonneg(cursor, mul_nonneg(s.width[i], s.in_dim[i], fn), fn);
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

// Summation scheme of one piece (both kernels implement exactly this, so
// they agree bit for bit): element k of the piece goes to lane k % kLanes.
// Columns 0-3 are float32 terms (w*w, |g|, |w*g|, (w*g)*(w*g), each product
// rounded to float) summed per lane in float32 over runs of kRun elements;
// at the end of each run every lane is converted to double and added to the
// lane's double accumulator. Column 6 (AdaLoRA) is accumulated per lane in
// double directly (s_new * u_new is exact in double). At the end of the
// piece the kLanes double lanes are combined by a fixed pairwise tree.
constexpr int kLanes = 16;
constexpr int64_t kRun = 1024;  // multiple of kLanes: 64 float additions per lane and run
static_assert(kRun % kLanes == 0, "runs must consist of whole lane groups");

struct Coeffs {
  float thr;  // |w| < thr (float) <=> |w| < threshold (double), see float_threshold
  double b1, c1, b2, c2;
};

// The smallest float >= t: for every float x, x < t <=> x < float_threshold(t).
float float_threshold(double t) {
  float f = static_cast<float>(t);
  if (static_cast<double>(f) < t) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// Fixed-order pairwise combination of the lanes.
double fold_lanes(double* a) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) a[l] += a[l + width];
  return a[0];
}

// Per-lane state of one piece, in memory between runs.
struct LaneSums {
  double d[5][kLanes] = {};  // columns 0, 1, 2, 3, 6
  int64_t zeros = 0, small = 0;

  void finish(int64_t len, double* out) {
    out[0] = fold_lanes(d[0]);
    out[1] = fold_lanes(d[1]);
    out[2] = fold_lanes(d[2]);
    out[3] = fold_lanes(d[3]);
    out[4] = static_cast<double>(zeros);
    out[5] = static_cast<double>(small);
    out[6] = fold_lanes(d[4]);
    out[7] = static_cast<double>(len);
  }
};

// One element, scalar. f: float run sums of lane l (columns 0-3), su: double
// lane of column 6. The products are separate statements from the sums; the
// build pins -ffp-contract=off so that they are never fused into an FMA.
template <bool kGrad, bool kSens>
inline void scalar_step(const float* w, const float* g, float* sens, float* unc, int64_t k,
                        const Coeffs& c, float (&f)[4][kLanes], double* su, int l, int64_t& zeros,
                        int64_t& small) {
  const float wv = w[k];
  const float gv = kGrad ? g[k] : 0.0f;
  const float aw = std::fabs(wv), ag = std::fabs(gv);
  const float ww = aw * aw;     // = w * w
  const float awg = aw * ag;    // = |w * g| (rounding is symmetric)
  const float wg2 = awg * awg;  // = (w * g)^2
  f[0][l] += ww;
  f[1][l] += ag;
  f[2][l] += awg;
  f[3][l] += wg2;
  zeros += (wv == 0.0f) ? 1 : 0;
  small += (aw < c.thr) ? 1 : 0;
  if constexpr (kSens) {
    const double imp = std::fabs(static_cast<double>(wv) * static_cast<double>(gv));  // exact
    const double p1 = c.b1 * static_cast<double>(sens[k]);
    const double p2 = c.c1 * imp;
    const float s_new = static_cast<float>(p1 + p2);
    const double dev = std::fabs(imp - static_cast<double>(s_new));
    const double q1 = c.b2 * static_cast<double>(unc[k]);
    const double q2 = c.c2 * dev;
    const float u_new = static_cast<float>(q1 + q2);
    sens[k] = s_new;
    unc[k] = u_new;
    su[l] += static_cast<double>(s_new) * static_cast<double>(u_new);  // exact product
  }
}

// Portable kernel: plain loops (auto-vectorizable), any architecture.
template <bool kGrad, bool kSens>
void piece_portable(const float* w, const float* g, float* sens, float* unc, int64_t len,
                    const Coeffs& c, double* out) {
  LaneSums acc;
  for (int64_t r0 = 0; r0 < len; r0 += kRun) {
    const int64_t r1 = std::min(len, r0 + kRun);
    float f[4][kLanes] = {};
    int64_t k = r0;
    for (; k + kLanes <= r1; k += kLanes)
      for (int l = 0; l < kLanes; ++l)
        scalar_step<kGrad, kSens>(w, g, sens, unc, k + l, c, f, acc.d[4], l, acc.zeros, acc.small);
    for (; k < r1; ++k)
      scalar_step<kGrad, kSens>(w, g, sens, unc, k, c, f, acc.d[4], static_cast<int>(k % kLanes),
                                acc.zeros, acc.small);
    for (int col = 0; col < 4; ++col)
      for (int l = 0; l < kLanes; ++l) acc.d[col][l] += static_cast<double>(f[col][l]);
  }
  acc.finish(len, out);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PRUNEPEFT_X86_AVX2 1

// An empty asm that "modifies" v: the compiler can no longer fuse the
// multiplication that produced v with the addition that consumes it, so the
// AVX2 kernel rounds products separately (as the portable one and the torch
// reference do) even if some build turned contraction on.
#define PP_NOFUSE(v) __asm__("" : "+x"(v))

// Floats 4q .. 4q+3 of x as doubles (exact).
__attribute__((target("avx2"))) inline __m256d cvt_half(__m256 x, int q) {
  return _mm256_cvtps_pd(q ? _mm256_extractf128_ps(x, 1) : _mm256_castps256_ps128(x));
}

// AVX2 kernel: 16 elements (two 8-float halves) per step, same lanes, same
// operations and same order as piece_portable.
template <bool kGrad, bool kSens>
__attribute__((target("avx2"))) void piece_avx2(const float* w, const float* g, float* sens,
                                                float* unc, int64_t len, const Coeffs& c,
                                                double* out) {
  LaneSums acc;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 thr = _mm256_set1_ps(c.thr);
  const __m256d sign_d = _mm256_set1_pd(-0.0);
  const __m256d b1 = _mm256_set1_pd(c.b1), c1 = _mm256_set1_pd(c.c1);
  const __m256d b2 = _mm256_set1_pd(c.b2), c2 = _mm256_set1_pd(c.c2);
  __m256i nz = _mm256_setzero_si256(), ns = _mm256_setzero_si256();  // int32 count lanes
  __m256d su[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(),
                   _mm256_setzero_pd()};

  for (int64_t r0 = 0; r0 < len; r0 += kRun) {
    const int64_t r1 = std::min(len, r0 + kRun);
    __m256 f[4][2];
    for (auto& fc : f) fc[0] = fc[1] = zero;
    int64_t k = r0;
    for (; k + kLanes <= r1; k += kLanes) {
      for (int h = 0; h < 2; ++h) {
        const int64_t e = k + 8 * h;
        const __m256 wv = _mm256_loadu_ps(w + e);
        const __m256 gv = kGrad ? _mm256_loadu_ps(g + e) : zero;
        const __m256 aw = _mm256_andnot_ps(sign, wv);
        const __m256 ag = _mm256_andnot_ps(sign, gv);
        __m256 ww = _mm256_mul_ps(aw, aw);
        __m256 awg = _mm256_mul_ps(aw, ag);
        __m256 wg2 = _mm256_mul_ps(awg, awg);
        PP_NOFUSE(ww);
        PP_NOFUSE(awg);
        PP_NOFUSE(wg2);
        f[0][h] = _mm256_add_ps(f[0][h], ww);
        f[1][h] = _mm256_add_ps(f[1][h], ag);
        f[2][h] = _mm256_add_ps(f[2][h], awg);
        f[3][h] = _mm256_add_ps(f[3][h], wg2);
        // Compare masks are all-ones (= -1) per true lane.
        nz = _mm256_sub_epi32(nz, _mm256_castps_si256(_mm256_cmp_ps(wv, zero, _CMP_EQ_OQ)));
        ns = _mm256_sub_epi32(ns, _mm256_castps_si256(_mm256_cmp_ps(aw, thr, _CMP_LT_OQ)));
        if constexpr (kSens) {
          const __m256 sv = _mm256_loadu_ps(sens + e);
          const __m256 uv = _mm256_loadu_ps(unc + e);
          __m128 s_out[2], u_out[2];
          for (int q = 0; q < 2; ++q) {  // 4 doubles at a time
            const __m256d imp = _mm256_andnot_pd(sign_d, _mm256_mul_pd(cvt_half(wv, q), cvt_half(gv, q)));
            __m256d p1 = _mm256_mul_pd(b1, cvt_half(sv, q));
            __m256d p2 = _mm256_mul_pd(c1, imp);
            PP_NOFUSE(p1);
            PP_NOFUSE(p2);
            s_out[q] = _mm256_cvtpd_ps(_mm256_add_pd(p1, p2));
            const __m256d s_new = _mm256_cvtps_pd(s_out[q]);
            const __m256d dev = _mm256_andnot_pd(sign_d, _mm256_sub_pd(imp, s_new));
            __m256d q1 = _mm256_mul_pd(b2, cvt_half(uv, q));
            __m256d q2 = _mm256_mul_pd(c2, dev);
            PP_NOFUSE(q1);
            PP_NOFUSE(q2);
            u_out[q] = _mm256_cvtpd_ps(_mm256_add_pd(q1, q2));
            __m256d prod = _mm256_mul_pd(s_new, _mm256_cvtps_pd(u_out[q]));
            PP_NOFUSE(prod);
            su[2 * h + q] = _mm256_add_pd(su[2 * h + q], prod);
          }
          _mm256_storeu_ps(sens + e, _mm256_insertf128_ps(_mm256_castps128_ps256(s_out[0]), s_out[1], 1));
          _mm256_storeu_ps(unc + e, _mm256_insertf128_ps(_mm256_castps128_ps256(u_out[0]), u_out[1], 1));
        }
      }
    }
    // Spill the run sums, finish a partial lane group in scalar code (same
    // lanes), then add the run into the double lanes.
    alignas(32) float fs[4][kLanes];
    for (int col = 0; col < 4; ++col) {
      _mm256_store_ps(fs[col], f[col][0]);
      _mm256_store_ps(fs[col] + 8, f[col][1]);
    }
    if (k < r1) {
      alignas(32) double sus[kLanes] = {};
      if constexpr (kSens)
        for (int j = 0; j < 4; ++j) _mm256_store_pd(sus + 4 * j, su[j]);
      for (; k < r1; ++k)
        scalar_step<kGrad, kSens>(w, g, sens, unc, k, c, fs, sus, static_cast<int>(k % kLanes),
                                  acc.zeros, acc.small);
      if constexpr (kSens)
        for (int j = 0; j < 4; ++j) su[j] = _mm256_load_pd(sus + 4 * j);
    }
    for (int col = 0; col < 4; ++col)
      for (int j = 0; j < kLanes; j += 4)
        _mm256_storeu_pd(acc.d[col] + j, _mm256_add_pd(_mm256_loadu_pd(acc.d[col] + j),
                                                       _mm256_cvtps_pd(_mm_load_ps(fs[col] + j))));
  }
  if constexpr (kSens)
    for (int j = 0; j < 4; ++j) _mm256_storeu_pd(acc.d[4] + 4 * j, su[j]);
  // Each count lane holds at most len / 8 <= kChunk / 8: no int32 overflow.
  alignas(32) int32_t cnt[2][8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(cnt[0]), nz);
  _mm256_store_si256(reinterpret_cast<__m256i*>(cnt[1]), ns);
  for (int l = 0; l < 8; ++l) {
    acc.zeros += cnt[0][l];
    acc.small += cnt[1][l];
  }
  acc.finish(len, out);
}

#define PP_NOFUSE512(v) __asm__("" : "+v"(v))

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized (_mm512_undefined_pd).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Doubles of floats 8q .. 8q+7 of x (exact).
__attribute__((target("avx512f"))) inline __m512d cvt_half512(__m512 x, int q) {
  return _mm512_cvtps_pd(q ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))
                           : _mm512_castps512_ps256(x));
}

// AVX-512F kernel: one 16-float vector per step = the kLanes lanes; same
// operations and order as piece_portable, half the instructions of AVX2.
template <bool kGrad, bool kSens>
__attribute__((target("avx512f"))) void piece_avx512(const float* w, const float* g, float* sens,
                                                    float* unc, int64_t len, const Coeffs& c,
                                                    double* out) {
  LaneSums acc;
  const __m512 zero = _mm512_setzero_ps();
  const __m512 thr = _mm512_set1_ps(c.thr);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512d b1 = _mm512_set1_pd(c.b1), c1 = _mm512_set1_pd(c.c1);
  const __m512d b2 = _mm512_set1_pd(c.b2), c2 = _mm512_set1_pd(c.c2);
  __m512i nz = _mm512_setzero_si512(), ns = _mm512_setzero_si512();  // int32 count lanes
  __m512d su[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};

  for (int64_t r0 = 0; r0 < len; r0 += kRun) {
    const int64_t r1 = std::min(len, r0 + kRun);
    __m512 f[4] = {zero, zero, zero, zero};
    int64_t k = r0;
    for (; k + kLanes <= r1; k += kLanes) {
      const __m512 wv = _mm512_loadu_ps(w + k);
      const __m512 gv = kGrad ? _mm512_loadu_ps(g + k) : zero;
      const __m512 aw = _mm512_abs_ps(wv);
      const __m512 ag = _mm512_abs_ps(gv);
      __m512 ww = _mm512_mul_ps(aw, aw);
      __m512 awg = _mm512_mul_ps(aw, ag);
      __m512 wg2 = _mm512_mul_ps(awg, awg);
      PP_NOFUSE512(ww);
      PP_NOFUSE512(awg);
      PP_NOFUSE512(wg2);
      f[0] = _mm512_add_ps(f[0], ww);
      f[1] = _mm512_add_ps(f[1], ag);
      f[2] = _mm512_add_ps(f[2], awg);
      f[3] = _mm512_add_ps(f[3], wg2);
      nz = _mm512_mask_add_epi32(nz, _mm512_cmp_ps_mask(wv, zero, _CMP_EQ_OQ), nz, one);
      ns = _mm512_mask_add_epi32(ns, _mm512_cmp_ps_mask(aw, thr, _CMP_LT_OQ), ns, one);
      if constexpr (kSens) {
        const __m512 sv = _mm512_loadu_ps(sens + k);
        const __m512 uv = _mm512_loadu_ps(unc + k);
        __m256 s_out[2], u_out[2];
        for (int q = 0; q < 2; ++q) {  // 8 doubles at a time
          const __m512d imp = _mm512_abs_pd(_mm512_mul_pd(cvt_half512(wv, q), cvt_half512(gv, q)));
          __m512d p1 = _mm512_mul_pd(b1, cvt_half512(sv, q));
          __m512d p2 = _mm512_mul_pd(c1, imp);
          PP_NOFUSE512(p1);
          PP_NOFUSE512(p2);
          s_out[q] = _mm512_cvtpd_ps(_mm512_add_pd(p1, p2));
          const __m512d s_new = _mm512_cvtps_pd(s_out[q]);
          const __m512d dev = _mm512_abs_pd(_mm512_sub_pd(imp, s_new));
          __m512d q1 = _mm512_mul_pd(b2, cvt_half512(uv, q));
          __m512d q2 = _mm512_mul_pd(c2, dev);
          PP_NOFUSE512(q1);
          PP_NOFUSE512(q2);
          u_out[q] = _mm512_cvtpd_ps(_mm512_add_pd(q1, q2));
          __m512d prod = _mm512_mul_pd(s_new, _mm512_cvtps_pd(u_out[q]));
          PP_NOFUSE512(prod);
          su[q] = _mm512_add_pd(su[q], prod);
        }
        _mm256_storeu_ps(sens + k, s_out[0]);
        _mm256_storeu_ps(sens + k + 8, s_out[1]);
        _mm256_storeu_ps(unc + k, u_out[0]);
        _mm256_storeu_ps(unc + k + 8, u_out[1]);
      }
    }
    alignas(64) float fs[4][kLanes];
    for (int col = 0; col < 4; ++col) _mm512_store_ps(fs[col], f[col]);
    if (k < r1) {
      alignas(64) double sus[kLanes] = {};
      if constexpr (kSens)
        for (int j = 0; j < 2; ++j) _mm512_store_pd(sus + 8 * j, su[j]);
      for (; k < r1; ++k)
        scalar_step<kGrad, kSens>(w, g, sens, unc, k, c, fs, sus, static_cast<int>(k % kLanes),
                                  acc.zeros, acc.small);
      if constexpr (kSens)
        for (int j = 0; j < 2; ++j) su[j] = _mm512_load_pd(sus + 8 * j);
    }
    for (int col = 0; col < 4; ++col)
      for (int j = 0; j < kLanes; j += 8)
        _mm512_storeu_pd(acc.d[col] + j, _mm512_add_pd(_mm512_loadu_pd(acc.d[col] + j),
                                                       _mm512_cvtps_pd(_mm256_load_ps(fs[col] + j))));
  }
  if constexpr (kSens)
    for (int j = 0; j < 2; ++j) _mm512_storeu_pd(acc.d[4] + 8 * j, su[j]);
  // Each count lane holds at most len / 16 <= kChunk / 16: no int32 overflow.
  alignas(64) int32_t cnt[2][16];
  _mm512_store_si512(cnt[0], nz);
  _mm512_store_si512(cnt[1], ns);
  for (int l = 0; l < 16; ++l) {
    acc.zeros += cnt[0][l];
    acc.small += cnt[1][l];
  }
  acc.finish(len, out);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// 2: AVX-512F, 1: AVX2, 0: neither (checked once; includes OS support).
int cpu_simd_level() {
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    return __builtin_cpu_supports("avx2") ? 1 : 0;
  }();
  return level;
}
#endif  // x86-64

template <bool kGrad, bool kSens>
void piece_stats(const float* w, const float* g, float* sens, float* unc, int64_t len,
                 const Coeffs& c, bool portable, double* out) {
#ifdef PRUNEPEFT_X86_AVX2
  const int level = portable ? 0 : cpu_simd_level();
  if (level == 2) return piece_avx512<kGrad, kSens>(w, g, sens, unc, len, c, out);
  if (level == 1) return piece_avx2<kGrad, kSens>(w, g, sens, unc, len, c, out);
#else
  (void)portable;
#endif
  piece_portable<kGrad, kSens>(w, g, sens, unc, len, c, out);
}

void run_piece(const StatsInputs& in, const StatsOptions& opt, const Coeffs& c, const Piece& pc,
               double* out) {
  const float* w = in.param.data + pc.offset;
  const float* g = in.grad.present() ? in.grad.data + pc.offset : nullptr;
  float* s = in.sens.present() ? in.sens.data + pc.offset : nullptr;
  float* u = in.unc.present() ? in.unc.data + pc.offset : nullptr;
  const bool pt = opt.portable_kernel;
  if (g && s) piece_stats<true, true>(w, g, s, u, pc.length, c, pt, out);
  else if (g) piece_stats<true, false>(w, g, s, u, pc.length, c, pt, out);
  else if (s) piece_stats<false, true>(w, g, s, u, pc.length, c, pt, out);
  else piece_stats<false, false>(w, g, s, u, pc.length, c, pt, out);
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
  c.block_gather.assign(static_cast<size_t>(np.n_blocks), -1);
  for (int64_t i = 0; i < n; ++i) {
    int64_t k = 0;  // index of the next kept block within the candidate
    for (int64_t ob = oc(i, 6); ob < oc(i, 6) + oc(i, 5); ++ob)
      if (keep[ob]) c.block_gather[static_cast<size_t>(nc(i, 6) + k++)] = ob;
  }

  // gather: one pass over the new segments, which tile [0, total) in layout
  // order; each is a run of consecutive old indices. Appending the runs
  // writes every entry once (no pre-fill pass: at the 7B scale the gather is
  // ~350 MB and writing fresh memory is the whole cost).
  c.gather.reserve(static_cast<size_t>(np.total));
  int64_t buf[1024];
  auto append_run = [&](int64_t src, int64_t len) {
    for (int64_t t = 0; t < len; t += 1024) {
      const int64_t m = std::min<int64_t>(1024, len - t);
      for (int64_t u = 0; u < m; ++u) buf[u] = src + t + u;
      c.gather.insert(c.gather.end(), buf, buf + m);
    }
  };
  for (int64_t s = 0; s < np.n_segs; ++s) {
    const int64_t off = np.seg[static_cast<size_t>(3 * s)], len = np.seg[static_cast<size_t>(3 * s + 1)];
    const int64_t owner = np.seg[static_cast<size_t>(3 * s + 2)];
    if (owner >= np.n_blocks) {  // a candidate's bu
      append_run(oc(owner - np.n_blocks, 3), len);
      continue;
    }
    const int64_t i = np.block[static_cast<size_t>(owner * kBlockCols)];
    const int64_t j = c.block_gather[static_cast<size_t>(owner)] - oc(i, 6);  // old block within i
    const int64_t bs = spec.block_size[i];
    // Per group the D's precede the Ut's, which precede the bd's.
    if (nc(i, 2) >= 0 && off >= nc(i, 2)) append_run(oc(i, 2) + j * bs, len);
    else if (off >= nc(i, 1)) append_run(oc(i, 1) + j * bs * spec.out_dim[i], len);
    else append_run(oc(i, 0) + j * bs * spec.in_dim[i], len);
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
  const Coeffs coeffs{float_threshold(opt.threshold), opt.beta1, 1.0 - opt.beta1, opt.beta2,
                      1.0 - opt.beta2};
  std::atomic<size_t> next{0};
  auto worker = [&]() {
    for (size_t t = next.fetch_add(1); t < n_tasks; t = next.fetch_add(1))
      for (size_t p = task_begin[t]; p < task_begin[t + 1]; ++p)
        run_piece(in, opt, coeffs, pieces[p], partial.data() + p * kStatCols);
  };

  int64_t n_threads = opt.n_threads;
  if (n_threads == 0) n_threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  n_threads = std::min<int64_t>(n_threads, static_cast<int64_t>(n_tasks));
  detail::parallel_run(n_threads, worker);  // the persistent pool, see thread_pool.hpp

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
