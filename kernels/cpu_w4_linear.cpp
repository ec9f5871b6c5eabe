// Torch glue of the W4A32 linear (cpu_kern_w4.h): x gathered once, the layers' buffers as stored.
//
// The spec is quantsink.weights.qmatmul.quant_linear_ref in float32: y = x_q @ ((c - zp) * s).T
// + x_o @ W_o.T + bias, for codes c packed two per byte (code 2j in the low nibble of byte j),
// fp16 scales s and uint8 zero points zp per (row, group of G input channels), and fp16
// outlier columns W_o. Several layers that read the same input (q/k/v, gate/up) are one call:
// x is gathered once, split into its even and odd kept channels (QsW4Input). The loop over
// output rows is shared out with at::parallel_for (torch's threads); the kernel of the selected
// ISA level (or the `isa` argument) runs each share.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <vector>

#include "cpu_dispatch.h"

namespace {

struct Split {  // the storage behind a QsW4Input
  std::vector<float> xe, xh, xo;
  QsW4Input in;
};

template <typename T>
void split_input(const T* x, int64_t M, int64_t in, const int64_t* gather, int64_t nq, int64_t k,
                 int64_t ngroups, int64_t G, Split& s) {
  const int64_t half = ngroups * G / 2, kpad = (k + 15) / 16 * 16;
  s.xe.assign(M * half, 0.f), s.xh.assign(M * half, 0.f), s.xo.assign(M * kpad, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * in;
    for (int64_t j = 0; j < nq; ++j) {
      const float v = static_cast<float>(xr[gather ? gather[j] : j]);
      ((j & 1) ? s.xh : s.xe)[m * half + j / 2] = v;
    }
    for (int64_t j = 0; j < k; ++j) s.xo[m * kpad + j] = static_cast<float>(xr[gather[nq + j]]);
  }
  s.in = QsW4Input{s.xe.data(), s.xh.data(), s.xo.data(), M, half, kpad, k, G, nq};
}

void check_layer(size_t i, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                 const at::Tensor& wo, const at::Tensor& bias, int64_t nq, int64_t ngroups, int64_t k) {
  const int64_t N = packed.size(0);
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kInt && packed.size(1) * 8 >= nq &&
                  scale.is_contiguous() && scale.scalar_type() == at::kHalf && scale.size(0) == N &&
                  scale.size(1) == ngroups && zero.is_contiguous() && zero.scalar_type() == at::kByte &&
                  zero.sizes() == scale.sizes() &&
                  (k == 0 || (wo.is_contiguous() && wo.scalar_type() == at::kHalf && wo.size(0) == N &&
                              wo.size(1) == k)) &&
                  (bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.numel() == N)),
              "w4_linear: layer ", i, " buffers do not match a 4-bit QuantLinear of this input");
}

}  // namespace

// x: [M, in] float32 / bf16, contiguous. gather: int64 [n_q + k] (kept channels, then the
// outlier channels), or empty when x is used as is (k == 0, n_q == in). Per layer i: packed
// int32 [N_i, words], scale fp16 [N_i, groups], zero uint8 [N_i, groups], outlier weight fp16
// [N_i, k], bias float32 [N_i] or empty. isa: "" (the selected level) or a level name.
// Returns the layers' outputs [M, N_i] in x's dtype.
std::vector<at::Tensor> w4_linear(const at::Tensor& x, const at::Tensor& gather, int64_t nq, int64_t group_size,
                                  const std::vector<at::Tensor>& packed, const std::vector<at::Tensor>& scale,
                                  const std::vector<at::Tensor>& zero, const std::vector<at::Tensor>& outlier_w,
                                  const std::vector<at::Tensor>& bias, const std::string& isa) {
  const QsKernels& kern = qs_kernels(isa);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "w4_linear: x must be [M, in] on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "w4_linear: x must be float32 or bf16");
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && !packed.empty(), "w4_linear: even group size, at least one layer");
  TORCH_CHECK(scale.size() == packed.size() && zero.size() == packed.size() && outlier_w.size() == packed.size() &&
              bias.size() == packed.size(), "w4_linear: one scale, zero, outlier weight and bias per layer");
  const int64_t M = x.size(0), in = x.size(1), G = group_size;
  const int64_t k = gather.numel() ? gather.numel() - nq : 0, ngroups = (nq + G - 1) / G;
  TORCH_CHECK(gather.numel() ? gather.scalar_type() == at::kLong : (nq == in), "w4_linear: bad gather index");
  const int64_t* gp = gather.numel() ? gather.data_ptr<int64_t>() : nullptr;
  Split s;
  if (x.scalar_type() == at::kFloat) split_input(x.data_ptr<float>(), M, in, gp, nq, k, ngroups, G, s);
  else split_input(x.data_ptr<c10::BFloat16>(), M, in, gp, nq, k, ngroups, G, s);
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < packed.size(); ++i) {
    check_layer(i, packed[i], scale[i], zero[i], outlier_w[i], bias[i], nq, ngroups, k);
    const int64_t N = packed[i].size(0);
    auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
    const QsW4Layer L{reinterpret_cast<const uint8_t*>(packed[i].data_ptr<int32_t>()), packed[i].size(1) * 4,
                      reinterpret_cast<const uint16_t*>(scale[i].data_ptr<at::Half>()), zero[i].data_ptr<uint8_t>(),
                      ngroups, k ? reinterpret_cast<const uint16_t*>(outlier_w[i].data_ptr<at::Half>()) : nullptr,
                      bias[i].numel() ? bias[i].data_ptr<float>() : nullptr, N, y.data_ptr<float>()};
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { kern.w4_linear(&L, &s.in, n0, n1); });
    outs.push_back(x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type()));
  }
  return outs;
}
