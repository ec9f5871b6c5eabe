// ISA levels: which are compiled in, what the CPU has, which level runs, and the Python module.
//
// Levels, best first: avx512 (AVX-512F/BW/VL + AVX2 + FMA + F16C), avx2 (AVX2 + FMA + F16C) and
// portable (any CPU). QS_HAVE_AVX512 / QS_HAVE_AVX2 are defined by kernels/cpu_ext.py when
// that object compiled; the portable object always is. CPU features come from
// __builtin_cpu_supports (x86; it also checks that the OS saves the vector state) or
// getauxval (aarch64). hide_cpu_features() makes features read as absent (for tests).
#include <torch/extension.h>

#include <algorithm>
#include <map>
#include <set>
#include <vector>
#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include "cpu_dispatch.h"

namespace {

struct Level {
  QsKernels k;
  bool compiled;
  std::vector<std::string> needs;  // CPU features
};

#ifdef QS_HAVE_AVX512
constexpr QsKernels AVX512{"avx512", qs_avx512_sink_decode, qs_avx512_w4_linear, qs_avx512_int8_rows};
#else
constexpr QsKernels AVX512{"avx512", nullptr, nullptr, nullptr};
#endif
#ifdef QS_HAVE_AVX2
constexpr QsKernels AVX2{"avx2", qs_avx2_sink_decode, qs_avx2_w4_linear, qs_avx2_int8_rows};
#else
constexpr QsKernels AVX2{"avx2", nullptr, nullptr, nullptr};
#endif
constexpr QsKernels PORTABLE{"portable", qs_portable_sink_decode, qs_portable_w4_linear, qs_portable_int8_rows};

const std::vector<Level>& levels() {
  static const std::vector<Level> all = {
      {AVX512, AVX512.w4_linear != nullptr, {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}},
      {AVX2, AVX2.w4_linear != nullptr, {"avx2", "fma", "f16c"}},
      {PORTABLE, true, {}}};
  return all;
}

std::set<std::string>& hidden() {
  static std::set<std::string> h;
  return h;
}

// The features the levels ask about (and asimd on ARM), as the CPU reports them.
std::map<std::string, bool> raw_features() {
  std::map<std::string, bool> f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f["avx2"] = __builtin_cpu_supports("avx2");
  f["fma"] = __builtin_cpu_supports("fma");
  f["f16c"] = __builtin_cpu_supports("f16c");
  f["avx512f"] = __builtin_cpu_supports("avx512f");
  f["avx512bw"] = __builtin_cpu_supports("avx512bw");
  f["avx512vl"] = __builtin_cpu_supports("avx512vl");
#elif defined(__aarch64__) && defined(__linux__)
  f["asimd"] = (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
#endif
  return f;
}

std::map<std::string, bool> cpu_features() {
  auto f = raw_features();
  for (auto& kv : f)
    if (hidden().count(kv.first)) kv.second = false;
  return f;
}

// "" when `lv` can run here, else why not ("not compiled" or the first missing feature).
std::string problem(const Level& lv) {
  if (!lv.compiled) return "not compiled";
  const auto f = cpu_features();
  for (const auto& need : lv.needs) {
    auto it = f.find(need);
    if (it == f.end() || !it->second) return "the CPU has no " + need;
  }
  return "";
}

const Level* find_level(const std::string& name) {
  for (const auto& lv : levels())
    if (name == lv.k.name) return &lv;
  return nullptr;
}

std::string& selected() {  // the best level that runs here, unless set_isa() chose another
  static std::string s = [] {
    for (const auto& lv : levels())
      if (problem(lv).empty()) return std::string(lv.k.name);
    return std::string("portable");
  }();
  return s;
}

std::string isa_problem(const std::string& name) {
  const Level* lv = find_level(name);
  return lv ? problem(*lv) : "unknown level (allowed: avx512, avx2, portable)";
}

void set_isa(const std::string& name) {
  const std::string why = isa_problem(name);
  TORCH_CHECK(why.empty(), "quantsink CPU kernels: level ", name, " cannot run here: ", why);
  selected() = name;
}

std::vector<std::string> compiled_levels() {
  std::vector<std::string> out;
  for (const auto& lv : levels())
    if (lv.compiled) out.push_back(lv.k.name);
  return out;
}

void hide_cpu_features(const std::vector<std::string>& names) {
  hidden() = std::set<std::string>(names.begin(), names.end());
  if (!isa_problem(selected()).empty()) selected() = "";
  for (const auto& lv : levels())
    if (selected().empty() && problem(lv).empty()) selected() = lv.k.name;
}

}  // namespace

const QsKernels& qs_kernels(const std::string& isa) {
  const std::string name = isa.empty() ? selected() : isa;
  const Level* lv = find_level(name);
  TORCH_CHECK(lv != nullptr, "quantsink CPU kernels: unknown ISA level '", name,
              "'; allowed: avx512, avx2, portable");
  const std::string why = problem(*lv);
  TORCH_CHECK(why.empty(), "quantsink CPU kernels: level ", name, " cannot run here: ", why);
  return lv->k;
}

namespace {

using at::Tensor;
using Tensors = std::vector<at::Tensor>;

// Each entry point twice: with `isa` last, and without it (the selected level).
void register_kernels(pybind11::module_& m) {
  m.def("sink_decode_cpu", &sink_decode_cpu, "decode attention over the sink-aware cache (CPU)");
  m.def("sink_decode_cpu", [](Tensor q, Tensor qs, Tensor sink_k, Tensor sink_v, Tensor kc, Tensor ks, Tensor kz,
                              Tensor oi, Tensor od, Tensor vc, Tensor vs, Tensor vz, Tensor win_k, Tensor win_v,
                              Tensor key_mask, Tensor sink_logits, int64_t koff, int64_t kgroup, int64_t kbits,
                              int64_t vbits, int64_t vgroup, bool vsym, double scale, int64_t window, double cap) {
    return sink_decode_cpu(q, qs, sink_k, sink_v, kc, ks, kz, oi, od, vc, vs, vz, win_k, win_v, key_mask,
                           sink_logits, koff, kgroup, kbits, vbits, vgroup, vsym, scale, window, cap, "");
  });
  m.def("w4_linear", &w4_linear, "4-bit QuantLinear layers sharing an input, from their stored buffers (CPU)");
  m.def("w4_linear", [](const Tensor& x, const Tensor& gather, int64_t nq, int64_t group_size, const Tensors& packed,
                        const Tensors& scale, const Tensors& zero, const Tensors& outlier_w, const Tensors& bias) {
    return w4_linear(x, gather, nq, group_size, packed, scale, zero, outlier_w, bias, "");
  });
  m.def("int8_rows", &int8_rows, "x @ (weight_int8 * weight_scale[:, None]).T in float32 (CPU)");
  m.def("int8_rows", [](const Tensor& x, const Tensor& w, const Tensor& s) { return int8_rows(x, w, s, ""); });
  m.def("int4pack_linear", &int4pack_linear, "a QuantLinear through torch's int4pack kernel (CPU)");
  m.def("int4pack_linear", [](const Tensor& x, const Tensor& packed, const Tensor& scales_zeros, const Tensor& gather,
                              int64_t pad, const Tensor& outlier_weight_t, const Tensor& bias, int64_t group_size,
                              int64_t out_features, const std::string& isa) {
    qs_kernels(isa);  // the same on every level (aten's kernel); a level that cannot run still raises
    return int4pack_linear(x, packed, scales_zeros, gather, pad, outlier_weight_t, bias, group_size, out_features);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_kernels(m);
  m.def("cpu_features", &cpu_features, "CPU features the levels need, as found (hidden ones read false)");
  m.def("compiled_levels", &compiled_levels, "ISA levels compiled into this extension, best first");
  m.def("isa_problem", &isa_problem, "'' when a level runs here, else why not");
  m.def("set_isa", &set_isa, "select the default level of every entry point");
  m.def("get_isa", [] { return selected(); }, "the default level");
  m.def("hide_cpu_features", &hide_cpu_features, "treat these CPU features as absent (tests)");
}
