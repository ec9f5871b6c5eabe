// The ISA levels as the torch glue sees them (glue translation units only: baseline flags).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "cpu_isa.h"

// The entry points of one level (cpu_isa.h); null where the level is not compiled in.
struct QsKernels {
  const char* name;
  void (*sink_decode)(const QsDecodeArgs*, int64_t, int64_t, float*);
  void (*w4_linear)(const QsW4Layer*, const QsW4Input*, int64_t, int64_t);
  void (*int8_rows)(const QsInt8Args*, int64_t, int64_t);
};

// The kernels of level `isa` ("" = the selected level). Raises (c10::Error) when the level
// is unknown, not compiled in, or needs a CPU feature this host lacks: an entry point built
// for a feature is never called without it.
const QsKernels& qs_kernels(const std::string& isa);

// The entry points (cpu_decode_attention.cpp, cpu_w4_linear.cpp, cpu_int8_rows.cpp,
// cpu_int4_linear.cpp); the Python module (cpu_dispatch.cpp) adds the overloads without `isa`.
at::Tensor sink_decode_cpu(at::Tensor q, at::Tensor qs, at::Tensor sink_k, at::Tensor sink_v, at::Tensor kc,
                           at::Tensor ks, at::Tensor kz, at::Tensor oi, at::Tensor od, at::Tensor vc, at::Tensor vs,
                           at::Tensor vz, at::Tensor win_k, at::Tensor win_v, at::Tensor key_mask,
                           at::Tensor sink_logits, int64_t koff, int64_t kgroup, int64_t kbits, int64_t vbits,
                           int64_t vgroup, bool vsym, double scale, int64_t sliding_window, double softcap,
                           const std::string& isa);
std::vector<at::Tensor> w4_linear(const at::Tensor& x, const at::Tensor& gather, int64_t nq, int64_t group_size,
                                  const std::vector<at::Tensor>& packed, const std::vector<at::Tensor>& scale,
                                  const std::vector<at::Tensor>& zero, const std::vector<at::Tensor>& outlier_w,
                                  const std::vector<at::Tensor>& bias, const std::string& isa);
at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& weight_int8, const at::Tensor& weight_scale,
                     const std::string& isa);
at::Tensor int4pack_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                           const at::Tensor& gather, int64_t pad, const at::Tensor& outlier_weight_t,
                           const at::Tensor& bias, int64_t group_size, int64_t out_features);
