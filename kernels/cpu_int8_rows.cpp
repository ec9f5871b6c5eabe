// Torch glue of the int8-rows product (cpu_kern_int8.h): the embedding / lm_head x @ (w * s).T.
//
// The spec is quantsink.weights.rows_ops.int8_rows_ref with compute_dtype float32. The
// vocabulary rows are shared out with at::parallel_for (torch's threads); w may sit at any
// address (a safetensors mmap view), only its rows must be contiguous.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_dispatch.h"

// x: float32 [M, H]; weight_int8: int8 [V, H]; weight_scale: fp16 [V]. isa: "" (the selected
// level) or a level name. Returns float32 [M, V].
at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& weight_int8, const at::Tensor& weight_scale,
                     const std::string& isa) {
  const QsKernels& kern = qs_kernels(isa);
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.scalar_type() == at::kFloat, "int8_rows: x must be float32 "
              "[M, H] on the CPU");
  TORCH_CHECK(weight_int8.dim() == 2 && weight_int8.scalar_type() == at::kChar && weight_int8.size(1) == x.size(1),
              "int8_rows: weight_int8 must be int8 [V, H] with x's H");
  TORCH_CHECK(weight_scale.scalar_type() == at::kHalf && weight_scale.numel() == weight_int8.size(0),
              "int8_rows: weight_scale must be float16 [V]");
  const at::Tensor xc = x.contiguous(), w = weight_int8.contiguous(), s = weight_scale.contiguous();
  const int64_t M = x.size(0), H = x.size(1), V = w.size(0);
  auto y = at::empty({M, V}, x.options());
  const QsInt8Args a{xc.data_ptr<float>(), w.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()),
                     y.data_ptr<float>(), M, H, V};
  if (M && V) at::parallel_for(0, V, 256, [&](int64_t v0, int64_t v1) { kern.int8_rows(&a, v0, v1); });
  return y;
}
