// Selection ops of fastsel on 1-D CPU float tensors: median, closest_k, extreme_k, loss_band.
//
// Registered with TORCH_LIBRARY under the namespace FASTSEL_NS (default `fastsel`, so `torch.ops.fastsel.*`).
// The just-in-time build of fastsel/select_ops.py compiles this same file with -DFASTSEL_NS=fastsel_jit, so a
// built `fastsel._C` and a JIT copy can live in one process without registering one namespace twice.
//
// All arithmetic is done in double, in a fixed order (plain left-to-right sums, no reassociation; build with
// -ffp-contract=off so no FMA is fused in), so the results equal a plain-Python reference on Python floats and
// the pure-torch fallback of select_ops.py bit for bit. Ties are broken by the lower index, so selections are
// deterministic. Bad input throws through TORCH_CHECK (RuntimeError in Python; the wrapper re-raises ValueError).
// The error messages are mirrored character for character by the Python fallback: change both together.

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#ifndef FASTSEL_NS
#define FASTSEL_NS fastsel
#endif

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

// Indirections so that macro arguments (FASTSEL_NS, TORCH_EXTENSION_NAME) are expanded before ## and #.
#define FASTSEL_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define FASTSEL_CONCAT_(a, b) a##b
#define FASTSEL_CONCAT(a, b) FASTSEL_CONCAT_(a, b)
#define FASTSEL_STR_(a) #a
#define FASTSEL_STR(a) FASTSEL_STR_(a)

namespace {

// At most this many positions are listed in a non-finite error message.
constexpr size_t kMaxListedPositions = 20;

// Validates a 1-D CPU float32/float64 tensor with only finite values and returns it as doubles.
std::vector<double> to_finite_doubles(const at::Tensor& values, const char* op) {
  TORCH_CHECK(values.dim() == 1, op, ": expected a 1-D tensor, got ", values.dim(), "-D");
  TORCH_CHECK(values.device().is_cpu(), op, ": expected a CPU tensor, got device ", values.device());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 values, got ", values.scalar_type());
  const at::Tensor d = values.to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  std::vector<double> out(p, p + d.numel());

  std::vector<int64_t> bad;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) bad.push_back(static_cast<int64_t>(i));
  }
  if (!bad.empty()) {
    std::string msg = std::string(op) + ": non-finite values at positions [";
    const size_t listed = std::min(bad.size(), kMaxListedPositions);
    for (size_t i = 0; i < listed; ++i) {
      if (i) msg += ", ";
      msg += std::to_string(bad[i]);
    }
    if (bad.size() > listed) {
      msg += ", ...] (" + std::to_string(bad.size()) + " in total)";
    } else {
      msg += "]";
    }
    TORCH_CHECK(false, msg);
  }
  return out;
}

void check_k(int64_t k, size_t n, const char* op) {
  TORCH_CHECK(k >= 0 && k <= static_cast<int64_t>(n), op, ": k must be in [0, ", n, "], got ", k);
}

// The k smallest indices under the strict total order `less`, returned in ascending index order.
template <typename Less>
at::Tensor select_k(size_t n, int64_t k, Less less) {
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), int64_t{0});
  if (k < static_cast<int64_t>(n)) std::nth_element(idx.begin(), idx.begin() + k, idx.end(), less);
  std::sort(idx.begin(), idx.begin() + k);
  at::Tensor out = at::empty({k}, at::TensorOptions().dtype(at::kLong));
  std::copy(idx.begin(), idx.begin() + k, out.data_ptr<int64_t>());
  return out;
}

// Median; for an even count the mean of the two middle values, (a + b) / 2.
double median(const at::Tensor& values) {
  std::vector<double> v = to_finite_doubles(values, "median");
  TORCH_CHECK(!v.empty(), "median: empty input");
  const size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + mid, v.end());
  const double hi = v[mid];
  if (v.size() % 2 == 1) return hi;
  const double lo = *std::max_element(v.begin(), v.begin() + mid);
  return (lo + hi) / 2.0;
}

// Indices of the k values closest to target by |v - target|; ties -> lower index; sorted ascending.
at::Tensor closest_k(const at::Tensor& values, double target, int64_t k) {
  const std::vector<double> v = to_finite_doubles(values, "closest_k");
  TORCH_CHECK(std::isfinite(target), "closest_k: target must be finite, got ", target);
  check_k(k, v.size(), "closest_k");
  std::vector<double> dist(v.size());
  for (size_t i = 0; i < v.size(); ++i) dist[i] = std::abs(v[i] - target);
  return select_k(v.size(), k, [&dist](int64_t a, int64_t b) {
    return dist[a] < dist[b] || (dist[a] == dist[b] && a < b);
  });
}

// Indices of the k smallest (largest=false) or k largest values; ties -> lower index; sorted ascending.
at::Tensor extreme_k(const at::Tensor& values, int64_t k, bool largest) {
  const std::vector<double> v = to_finite_doubles(values, "extreme_k");
  check_k(k, v.size(), "extreme_k");
  if (largest) {
    return select_k(v.size(), k, [&v](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  }
  return select_k(v.size(), k, [&v](int64_t a, int64_t b) { return v[a] < v[b] || (v[a] == v[b] && a < b); });
}

// Mask of |L - mean| <= c * std with the population std (divide by n); sums run left to right in double.
at::Tensor loss_band(const at::Tensor& losses, double c) {
  const std::vector<double> v = to_finite_doubles(losses, "loss_band");
  TORCH_CHECK(c >= 0.0, "loss_band: c must be >= 0, got ", c);
  const size_t n = v.size();
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kBool));
  if (n == 0) return out;
  double sum = 0.0;
  for (double x : v) sum += x;
  const double mean = sum / static_cast<double>(n);
  double ss = 0.0;
  for (double x : v) {
    const double dev = x - mean;
    const double sq = dev * dev;
    ss += sq;
  }
  const double threshold = c * std::sqrt(ss / static_cast<double>(n));
  bool* m = out.data_ptr<bool>();
  for (size_t i = 0; i < n; ++i) m[i] = std::abs(v[i] - mean) <= threshold;
  return out;
}

}  // namespace

FASTSEL_LIBRARY(FASTSEL_NS, m) {
  m.def("median(Tensor values) -> float", &median);
  m.def("closest_k(Tensor values, float target, int k) -> Tensor", &closest_k);
  m.def("extreme_k(Tensor values, int k, bool largest) -> Tensor", &extreme_k);
  m.def("loss_band(Tensor losses, float c) -> Tensor", &loss_band);
}

// An empty Python module: importing it dlopens this library, which runs the TORCH_LIBRARY registration above.
static PyModuleDef fastsel_module_def = {
    PyModuleDef_HEAD_INIT,
    FASTSEL_STR(TORCH_EXTENSION_NAME),
    "fastsel selection ops; importing registers torch.ops." FASTSEL_STR(FASTSEL_NS) ".*",
    -1,
    nullptr,
};

PyMODINIT_FUNC FASTSEL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&fastsel_module_def); }
