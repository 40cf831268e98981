// Packed module bank: layout planning, compaction, fused block statistics and
// budget-constrained selection (ARCHITECTURE.md §3).
//
// Pure C++17: no pybind11, no libtorch. Inputs are read-only (pointer, size)
// views; outputs are std::vector. Every invalid input raises
// std::invalid_argument with a message that names the function, the argument
// and (where it applies) the offending index. All offsets and sizes are int64.
#pragma once

#include <cstdint>
#include <vector>

namespace prunepeft {

// Column counts of the row-major tables returned by make_plan.
constexpr int64_t kCandCols = 8;   // d_off, u_off, bd_off, bu_off, width, n_blocks, first_block, group
constexpr int64_t kBlockCols = 3;  // cand, unit_start, block_size
constexpr int64_t kSegCols = 3;    // offset, length, owner
constexpr int64_t kStatCols = 8;   // see block_stats

// Elements per work piece in block_stats. Segments longer than this are split
// into pieces of exactly kChunk elements (the last one shorter). The split
// depends only on the segment table, never on the thread count.
constexpr int64_t kChunk = int64_t{1} << 16;

// A read-only view of `size` elements. `data == nullptr` means "absent"
// (optional arguments).
template <class T>
struct Span {
  const T* data = nullptr;
  int64_t size = 0;
  const T& operator[](int64_t i) const { return data[i]; }
  bool present() const { return data != nullptr; }
};

// A writable view, same conventions.
template <class T>
struct MutSpan {
  T* data = nullptr;
  int64_t size = 0;
  T& operator[](int64_t i) const { return data[i]; }
  bool present() const { return data != nullptr; }
};

// Candidate descriptors, one entry per candidate (structure of arrays).
struct CandidateSpec {
  Span<int64_t> in_dim;
  Span<int64_t> out_dim;
  Span<int64_t> width;
  Span<int64_t> block_size;
  Span<int64_t> group;
  Span<uint8_t> has_bias;  // non-zero = candidate has bd [width] and bu [out_dim]
};

// The layout of a bank. Tables are row-major with the column counts above.
//
// cand[i]:  d_off, u_off, bd_off, bu_off, width, n_blocks, first_block, group.
//           d_off / u_off (and bd_off when the candidate has a bias) are valid
//           start offsets even for width 0 (of an empty region); bd_off is -1
//           without bias; bu_off is -1 without bias or with width 0.
// block[b]: cand, unit_start (within the candidate), block_size.
// seg[s]:   offset, length, owner. owner = block id for a block's D / Ut / bd
//           segment, n_blocks + cand for a candidate's bu. Segments are in
//           layout (= offset) order and tile [0, total) exactly.
struct Plan {
  int64_t n_cand = 0;
  int64_t n_blocks = 0;
  int64_t n_segs = 0;
  int64_t total = 0;  // number of float elements in the bank
  std::vector<int64_t> cand;
  std::vector<int64_t> block;
  std::vector<int64_t> seg;
};

// Lays out the bank: groups in order of first appearance, candidates of a
// group in input order; per group the stacked D's, then the Ut's, then the
// bd's, then the bu's. Blocks and segments are numbered in layout order.
Plan make_plan(const CandidateSpec& spec);

struct Compaction {
  Plan plan;                          // make_plan with the new widths
  std::vector<int64_t> gather;        // [plan.total]: new_flat = old_flat[gather]
  std::vector<int64_t> block_gather;  // [plan.n_blocks]: old block id of each new block
};

// Drops the blocks with keep[b] == 0 (keep has one entry per block of
// make_plan(spec)). Kept blocks keep their order inside a candidate; a
// candidate left without blocks gets width 0 and loses its bu.
Compaction compact(const CandidateSpec& spec, Span<uint8_t> keep);

// Inputs of block_stats. `seg` is a flattened [n_segs, 3] table (offset,
// length, owner) with size = 3 * n_segs. grad absent = zeros. sens and unc
// are given together or not at all and are updated in place; accum
// ([n_owners, 8], float64) is updated in place when given.
struct StatsInputs {
  Span<float> param;
  Span<float> grad;
  Span<int64_t> seg;
  int64_t n_owners = 0;
  MutSpan<float> sens;
  MutSpan<float> unc;
  MutSpan<double> accum;
};

struct StatsOptions {
  double threshold = 0.0;    // column 5 counts |w| < threshold
  double beta1 = 0.85;       // EMA factor of the sensitivity
  double beta2 = 0.85;       // EMA factor of the uncertainty
  double accum_beta = -1.0;  // < 0: accum += stats; in [0, 1]: accum = b*accum + (1-b)*stats
  int64_t n_threads = 0;     // 0 = std::thread::hardware_concurrency(); from a persistent pool
  bool portable_kernel = false;  // testing: skip the SIMD kernel (same results, bit for bit)
};

// Per-owner statistics, float64 [n_owners, 8] row-major, summed over the
// elements of the owner's segments:
//   0 sum w^2   1 sum |g|   2 sum |w g|   3 sum (w g)^2
//   4 count(w == 0)   5 count(|w| < threshold)
//   6 sum sens_new * unc_new (0 without sens/unc)   7 element count
// With sens/unc (AdaLoRA): I = |w g|, sens = b1 sens + (1-b1) I,
// unc = b2 unc + (1-b2) |I - sens_new|, evaluated in double and stored as
// float; column 6 uses the stored (float) values. The result is bitwise
// identical for every n_threads.
std::vector<double> block_stats(const StatsInputs& in, const StatsOptions& opt);

struct PruneInputs {
  Span<double> scores;       // [m], low = prune first
  Span<int64_t> costs;       // [m], >= 0
  Span<int64_t> group;       // [m], in [0, G)
  Span<int64_t> group_extra; // [G], >= 0, freed once every member of the group is pruned
  Span<uint8_t> eligible;    // [m]
  int64_t current = 0;
  int64_t target = 0;
};

// Greedy selection: visits eligible items by (score, index) ascending, prunes
// each (current -= cost, and -= group_extra when its group becomes fully
// pruned) and stops as soon as current <= target. Returns the pruned indices
// in prune order.
std::vector<int64_t> select_prune(const PruneInputs& in);

}  // namespace prunepeft
