// pybind11 bindings of the bank core: prunepeft._C.
//
// Arrays cross as numpy buffers. Read-only integer / mask inputs accept any
// integer or bool dtype and are converted to int64 (a copy only when needed);
// float data (param, grad) must already be float32, 1-D and C-contiguous so
// that it is never copied or silently down-cast; arrays updated in place (sens,
// unc, accum) must additionally be writable. Results are returned as new numpy
// arrays that own the C++ vectors (no copy). std::invalid_argument from the
// core becomes ValueError; the heavy functions release the GIL.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bank.hpp"

namespace py = pybind11;
using prunepeft::Span;
using prunepeft::MutSpan;

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using F64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

std::string prefix(const char* fn, const char* name) { return std::string(fn) + ": " + name; }

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

py::array as_array(py::handle obj, const char* fn, const char* name) {
  py::array a = py::array::ensure(obj);
  if (!a) throw py::value_error(prefix(fn, name) + " must be array-like");
  return a;
}

// Any integer / bool array of the given rank, as C-contiguous int64.
I64Array as_i64(py::handle obj, const char* fn, const char* name, py::ssize_t ndim = 1) {
  py::array a = as_array(obj, fn, name);
  const char kind = a.dtype().kind();
  const bool empty_ok = a.size() == 0 && a.ndim() == ndim;  // np.asarray([]) is float64
  if (kind != 'i' && kind != 'u' && kind != 'b' && !empty_ok)
    throw py::value_error(prefix(fn, name) + " must be an integer array, got dtype " +
                          std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw py::value_error(prefix(fn, name) + " must be " + std::to_string(ndim) +
                          "-D, got shape " + shape_str(a));
  return I64Array::ensure(a);
}

// Any bool / integer 1-D array as a 0/1 byte mask.
std::vector<uint8_t> as_mask(py::handle obj, const char* fn, const char* name) {
  const I64Array a = as_i64(obj, fn, name);
  std::vector<uint8_t> m(static_cast<size_t>(a.size()));
  const int64_t* p = a.data();
  for (size_t i = 0; i < m.size(); ++i) m[i] = p[i] != 0 ? 1 : 0;
  return m;
}

// Any real 1-D array as C-contiguous float64.
F64Array as_f64(py::handle obj, const char* fn, const char* name) {
  py::array a = as_array(obj, fn, name);
  const char kind = a.dtype().kind();
  if (kind != 'f' && kind != 'i' && kind != 'u')
    throw py::value_error(prefix(fn, name) + " must be a real array, got dtype " +
                          std::string(py::str(a.dtype())));
  if (a.ndim() != 1) throw py::value_error(prefix(fn, name) + " must be 1-D, got shape " + shape_str(a));
  return F64Array::ensure(a);
}

// A float array used as is: exact dtype, rank, C-contiguous, optionally writable.
template <class T>
py::array_t<T> exact(py::handle obj, const char* fn, const char* name, py::ssize_t ndim, bool writable) {
  if (!py::isinstance<py::array>(obj))
    throw py::value_error(prefix(fn, name) + " must be a numpy array");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  const char* want = std::is_same<T, float>::value ? "float32" : "float64";
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::value_error(prefix(fn, name) + " must have dtype " + want + ", got " +
                          std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw py::value_error(prefix(fn, name) + " must be " + std::to_string(ndim) + "-D, got shape " +
                          shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(prefix(fn, name) + " must be C-contiguous");
  if (writable && !a.writeable()) throw py::value_error(prefix(fn, name) + " must be writable (updated in place)");
  return py::reinterpret_borrow<py::array_t<T>>(a);
}

// Runs f() with the GIL released and returns its result. Not
// py::gil_scoped_release: on Python < 3.14 a (daemon) thread that takes the
// GIL back while the interpreter finalizes is ended by pthread_exit, whose
// forced unwind through that guard's noexcept destructor aborts the whole
// process ("terminate called without an active exception", pybind11 issue
// 2215). Here the GIL is retaken in ordinary code, so the unwind passes.
template <class F>
auto without_gil(F&& f) -> decltype(f()) {
  PyThreadState* state = PyEval_SaveThread();
  decltype(f()) result;
  try {
    result = f();
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
  return result;
}

template <class T, int Flags>
Span<T> span(const py::array_t<T, Flags>& a) {
  return Span<T>{a.data(), static_cast<int64_t>(a.size())};
}
Span<uint8_t> span(const std::vector<uint8_t>& v) {
  return Span<uint8_t>{v.data(), static_cast<int64_t>(v.size())};
}

// Hands a vector to numpy without copying.
template <class T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  if (v.empty()) return py::array_t<T>(shape);
  auto holder = std::make_unique<std::vector<T>>(std::move(v));
  T* data = holder->data();
  py::capsule owner(holder.get(), [](void* p) { delete static_cast<std::vector<T>*>(p); });
  holder.release();  // the capsule owns it now
  return py::array_t<T>(shape, data, owner);
}

py::dict plan_to_dict(prunepeft::Plan&& p) {
  py::dict d;
  d["cand"] = to_numpy(std::move(p.cand), {p.n_cand, prunepeft::kCandCols});
  d["block"] = to_numpy(std::move(p.block), {p.n_blocks, prunepeft::kBlockCols});
  d["seg"] = to_numpy(std::move(p.seg), {p.n_segs, prunepeft::kSegCols});
  d["total"] = py::int_(p.total);
  return d;
}

// Keeps the converted candidate arrays alive while the core reads them.
struct SpecArrays {
  I64Array in_dim, out_dim, width, block_size, group;
  std::vector<uint8_t> has_bias;

  SpecArrays(py::handle in_dim_, py::handle out_dim_, py::handle width_, py::handle block_size_,
             py::handle group_, py::handle has_bias_, const char* fn)
      : in_dim(as_i64(in_dim_, fn, "in_dim")),
        out_dim(as_i64(out_dim_, fn, "out_dim")),
        width(as_i64(width_, fn, "width")),
        block_size(as_i64(block_size_, fn, "block_size")),
        group(as_i64(group_, fn, "group")),
        has_bias(as_mask(has_bias_, fn, "has_bias")) {}

  prunepeft::CandidateSpec spec() const {
    return {span(in_dim), span(out_dim), span(width), span(block_size), span(group), span(has_bias)};
  }
};

py::dict plan(py::handle in_dim, py::handle out_dim, py::handle width, py::handle block_size,
              py::handle group, py::handle has_bias) {
  const SpecArrays a(in_dim, out_dim, width, block_size, group, has_bias, "plan");
  return plan_to_dict(prunepeft::make_plan(a.spec()));
}

py::tuple compact(py::handle in_dim, py::handle out_dim, py::handle width, py::handle block_size,
                  py::handle group, py::handle has_bias, py::handle keep) {
  const SpecArrays a(in_dim, out_dim, width, block_size, group, has_bias, "compact");
  const std::vector<uint8_t> k = as_mask(keep, "compact", "keep");
  prunepeft::Compaction c = without_gil([&] { return prunepeft::compact(a.spec(), span(k)); });
  const auto total = static_cast<py::ssize_t>(c.gather.size());
  const auto nb = static_cast<py::ssize_t>(c.block_gather.size());
  return py::make_tuple(plan_to_dict(std::move(c.plan)), to_numpy(std::move(c.gather), {total}),
                        to_numpy(std::move(c.block_gather), {nb}));
}

py::array_t<double> block_stats(py::handle param, py::handle grad, py::handle seg, int64_t n_owners,
                                double threshold, py::handle sens, py::handle unc, double beta1,
                                double beta2, py::handle accum, double accum_beta, int64_t n_threads) {
  const char* fn = "block_stats";
  const auto p = exact<float>(param, fn, "param", 1, false);
  // Optional arrays (a default-constructed py::array_t is an empty array, not "none").
  std::optional<py::array_t<float>> g, s, u;
  std::optional<py::array_t<double>> acc;
  if (!grad.is_none()) g = exact<float>(grad, fn, "grad", 1, false);
  if (!sens.is_none()) s = exact<float>(sens, fn, "sens", 1, true);
  if (!unc.is_none()) u = exact<float>(unc, fn, "unc", 1, true);
  if (!accum.is_none()) {
    acc = exact<double>(accum, fn, "accum", 2, true);
    if (acc->shape(1) != prunepeft::kStatCols || acc->shape(0) != n_owners)
      throw py::value_error(std::string(fn) + ": accum must have shape (n_owners, 8) = (" +
                            std::to_string(n_owners) + ", 8), got " + shape_str(*acc));
  }
  const I64Array sg = as_i64(seg, fn, "seg", 2);
  if (sg.shape(1) != prunepeft::kSegCols)
    throw py::value_error(std::string(fn) + ": seg must have shape (n_segs, 3), got " + shape_str(sg));

  prunepeft::StatsInputs in;
  in.param = span(p);
  if (g) in.grad = span(*g);
  in.seg = span(sg);
  in.n_owners = n_owners;
  if (s) in.sens = MutSpan<float>{s->mutable_data(), static_cast<int64_t>(s->size())};
  if (u) in.unc = MutSpan<float>{u->mutable_data(), static_cast<int64_t>(u->size())};
  if (acc) in.accum = MutSpan<double>{acc->mutable_data(), static_cast<int64_t>(acc->size())};
  prunepeft::StatsOptions opt;
  opt.threshold = threshold;
  opt.beta1 = beta1;
  opt.beta2 = beta2;
  opt.accum_beta = accum_beta;
  opt.n_threads = n_threads;

  std::vector<double> out = without_gil([&] { return prunepeft::block_stats(in, opt); });
  return to_numpy(std::move(out), {n_owners, prunepeft::kStatCols});
}

py::array_t<int64_t> select_prune(py::handle scores, py::handle costs, py::handle group,
                                  py::handle group_extra, py::handle eligible, int64_t current,
                                  int64_t target) {
  const char* fn = "select_prune";
  const F64Array sc = as_f64(scores, fn, "scores");
  const I64Array co = as_i64(costs, fn, "costs");
  const I64Array gr = as_i64(group, fn, "group");
  const I64Array ex = as_i64(group_extra, fn, "group_extra");
  const std::vector<uint8_t> el = as_mask(eligible, fn, "eligible");
  prunepeft::PruneInputs in;
  in.scores = span(sc);
  in.costs = span(co);
  in.group = span(gr);
  in.group_extra = span(ex);
  in.eligible = span(el);
  in.current = current;
  in.target = target;
  std::vector<int64_t> picked = prunepeft::select_prune(in);
  const auto n = static_cast<py::ssize_t>(picked.size());
  return to_numpy(std::move(picked), {n});
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "prunepeft native core: packed module bank layout, compaction, block statistics, selection";

  // The core reports bad arguments as std::invalid_argument; make that a
  // ValueError explicitly (pybind11's default does too, but we rely on it).
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      py::set_error(PyExc_ValueError, e.what());
    }
  });

  m.attr("CHUNK") = py::int_(prunepeft::kChunk);

  m.def("plan", &plan, py::arg("in_dim"), py::arg("out_dim"), py::arg("width"), py::arg("block_size"),
        py::arg("group"), py::arg("has_bias"),
        "Lay out a bank; returns {'cand', 'block', 'seg': int64 arrays, 'total': int}.");
  m.def("compact", &compact, py::arg("in_dim"), py::arg("out_dim"), py::arg("width"),
        py::arg("block_size"), py::arg("group"), py::arg("has_bias"), py::arg("keep"),
        "Drop the blocks with keep == False; returns (new plan, gather, block_gather).");
  m.def("block_stats", &block_stats, py::arg("param"), py::arg("grad").none(true), py::arg("seg"),
        py::arg("n_owners"), py::arg("threshold"), py::arg("sens").none(true) = py::none(),
        py::arg("unc").none(true) = py::none(), py::arg("beta1") = 0.85, py::arg("beta2") = 0.85,
        py::arg("accum").none(true) = py::none(), py::arg("accum_beta") = -1.0,
        py::arg("n_threads") = 0,
        "Per-owner statistics float64 [n_owners, 8] in one pass over param and grad.");
  m.def("select_prune", &select_prune, py::arg("scores"), py::arg("costs"), py::arg("group"),
        py::arg("group_extra"), py::arg("eligible"), py::arg("current"), py::arg("target"),
        "Greedy budget-constrained selection; returns the pruned indices in prune order.");
}
