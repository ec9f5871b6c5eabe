// One call for a QuantLinear on torch's CPU int4pack kernel: gather + bf16, the kernel, outliers.
//
// The spec is quantsink.weights.cpu_int4.int4pack_linear_cpu (same arguments, same result up
// to the summation order of the fp32 outlier product): x's kept channels are gathered and
// rounded to bf16 (round to nearest even, like Tensor.to), the padding slots are zero, the
// int4pack kernel runs, and each output is y + xo . W_o + bias in fp32, cast to x's dtype.
// At decode a step calls this ~4 times per layer; the Python version spends as long in its
// dozen small ops as the kernel spends multiplying. Portable glue: the same on every ISA level
// (the optional `isa` argument is only checked, aten picks its own kernel).
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

namespace {

template <typename T>
void gather_rows(const T* x, int64_t M, int64_t in, const int64_t* gather, int64_t kq, int64_t pad,
                 int64_t k, c10::BFloat16* xq, float* xo) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * in;
    c10::BFloat16* qr = xq + m * kq;
    if (gather == nullptr) {
      for (int64_t j = 0; j < kq; ++j) qr[j] = c10::BFloat16(static_cast<float>(xr[j]));
      continue;
    }
    for (int64_t j = 0; j < kq - pad; ++j) qr[j] = c10::BFloat16(static_cast<float>(xr[gather[j]]));
    for (int64_t j = kq - pad; j < kq; ++j) qr[j] = c10::BFloat16(0.f);
    for (int64_t j = 0; j < k; ++j) xo[m * k + j] = static_cast<float>(xr[gather[kq + j]]);
  }
}

template <typename T>
void finish_rows(const c10::BFloat16* y, int64_t M, int64_t n_pad, int64_t N, const float* xo, int64_t k,
                 const float* wo, const float* bias, T* out) {
  std::vector<float> acc(N);
  for (int64_t m = 0; m < M; ++m) {
    const c10::BFloat16* yr = y + m * n_pad;
    for (int64_t n = 0; n < N; ++n) acc[n] = 0.f;
    for (int64_t j = 0; j < k; ++j) {  // acc = xo[m] @ W_o.T: [N]
      const float a = xo[m * k + j];
      const float* w = wo + j * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) acc[n] += a * w[n];
    }
    T* orow = out + m * N;
    for (int64_t n = 0; n < N; ++n) {
      float v = static_cast<float>(yr[n]) + acc[n];
      if (bias) v += bias[n];
      orow[n] = static_cast<T>(v);
    }
  }
}

}  // namespace

// x: [M, in] float32 or bf16, contiguous. packed / scales_zeros: the int4pack layout. gather:
// int64 [K_pad + k] (kept channels, `pad` padding slots, outlier channels) or empty (x as is).
// outlier_weight_t: float32 [k, N]. bias: float32 [N] or empty. Returns [M, N] in x's dtype.
at::Tensor int4pack_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                           const at::Tensor& gather, int64_t pad, const at::Tensor& outlier_weight_t,
                           const at::Tensor& bias, int64_t group_size, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "int4pack_linear: x must be [M, in] "
              "contiguous on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int4pack_linear: x must be float32 or bfloat16");
  const int64_t M = x.size(0), in = x.size(1), kq = packed.size(1) * 2;
  const int64_t k = outlier_weight_t.numel() ? outlier_weight_t.size(0) : 0;
  TORCH_CHECK(gather.numel() ? gather.numel() == kq + k : (in == kq && k == 0),
              "int4pack_linear: gather index does not match the packed weight");
  auto xq = at::empty({M, kq}, x.options().dtype(at::kBFloat16));
  std::vector<float> xo(M * k);
  const int64_t* gp = gather.numel() ? gather.data_ptr<int64_t>() : nullptr;
  if (x.scalar_type() == at::kFloat)
    gather_rows(x.data_ptr<float>(), M, in, gp, kq, pad, k, xq.data_ptr<c10::BFloat16>(), xo.data());
  else
    gather_rows(x.data_ptr<c10::BFloat16>(), M, in, gp, kq, pad, k, xq.data_ptr<c10::BFloat16>(), xo.data());
  auto y = at::_weight_int4pack_mm_for_cpu(xq, packed, group_size, scales_zeros);  // [M, N_pad] bf16
  auto out = at::empty({M, out_features}, x.options());
  const float* wo = k ? outlier_weight_t.data_ptr<float>() : nullptr;
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat)
    finish_rows(y.data_ptr<c10::BFloat16>(), M, y.size(1), out_features, xo.data(), k, wo, bp,
                out.data_ptr<float>());
  else
    finish_rows(y.data_ptr<c10::BFloat16>(), M, y.size(1), out_features, xo.data(), k, wo, bp,
                out.data_ptr<c10::BFloat16>());
  return out;
}
