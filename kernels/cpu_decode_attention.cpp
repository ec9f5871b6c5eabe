// Torch glue of the decode-attention kernel (cpu_kern_attention.h): checks, tensors, threads.
//
// The spec is quantsink.kv.attention.decode_attention_ref (one query per row, Lq == 1). Each
// (sequence, KV head) is one task of at::parallel_for (torch's threads) with scratch memory of
// its own; the kernel of the selected ISA level (or the `isa` argument) runs it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_dispatch.h"

namespace {

QsFloats floats_of(const at::Tensor& x) {  // x: contiguous
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "sink_decode_cpu: float tensors must be float32, float16 or bfloat16, got ", t);
  return QsFloats{x.numel() ? x.data_ptr() : nullptr, t == at::kFloat ? QS_F32 : t == at::kHalf ? QS_F16 : QS_BF16};
}

void check_body(const QsDecodeArgs& a, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& oi) {
  if (!a.T) return;
  TORCH_CHECK(a.kbits == 2 || a.kbits == 3 || a.kbits == 4 || a.kbits == 8, "sink_decode_cpu: key bits must be "
              "2, 3, 4 or 8, got ", a.kbits);
  TORCH_CHECK(a.vbits == 2 || a.vbits == 3 || a.vbits == 4 || a.vbits == 8, "sink_decode_cpu: value bits must be "
              "2, 3, 4 or 8, got ", a.vbits);
  TORCH_CHECK(kc.scalar_type() == at::kByte && vc.scalar_type() == at::kByte && kc.size(3) == a.D * a.kbits / 8 &&
              vc.size(3) == a.D * a.vbits / 8, "sink_decode_cpu: codes must be uint8 [B, Hkv, T, D * bits / 8]");
  TORCH_CHECK(a.vgroup > 0 && a.D % a.vgroup == 0 && a.kgroup > 0, "sink_decode_cpu: bad group sizes");
  TORCH_CHECK(oi.numel() == 0 || oi.scalar_type() == at::kByte || oi.scalar_type() == at::kShort,
              "sink_decode_cpu: key outlier slots must be uint8 or int16, got ", oi.scalar_type());
}

}  // namespace

// q, qs: [B, Hq, 1, D] (qs: the query of the sink region). Dense regions [B, Hkv, n, D]. Body
// tensors as in PackedBlock (vz empty and vsym: symmetric values, implied zero; oi uint8 or
// int16). key_mask: [B, S] bool or empty. sink_logits: [Hq] or empty. sliding_window <= 0:
// none. softcap <= 0: none. Float tensors may be fp32, fp16 or bf16. isa: "" (the selected
// level), "avx512", "avx2" or "portable". Returns [B, Hq, 1, D] float32.
at::Tensor sink_decode_cpu(at::Tensor q, at::Tensor qs, at::Tensor sink_k, at::Tensor sink_v,
                              at::Tensor kc, at::Tensor ks, at::Tensor kz, at::Tensor oi,
                              at::Tensor od, at::Tensor vc, at::Tensor vs, at::Tensor vz,
                              at::Tensor win_k, at::Tensor win_v, at::Tensor key_mask,
                              at::Tensor sink_logits, int64_t koff, int64_t kgroup, int64_t kbits,
                              int64_t vbits, int64_t vgroup, bool vsym, double scale, int64_t sliding_window,
                              double softcap, const std::string& isa) {
  const QsKernels& kern = qs_kernels(isa);
  for (at::Tensor* t : {&q, &qs, &sink_k, &sink_v, &kc, &ks, &kz, &oi, &od, &vc, &vs, &vz, &win_k, &win_v,
                           &key_mask, &sink_logits})
    *t = t->contiguous();  // a no-op for the cache's own tensors; evicted bodies are slices
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = sink_k.size(1);
  const int64_t T = kc.numel() ? kc.size(2) : 0;
  TORCH_CHECK(q.size(2) == 1 && D % 8 == 0 && Hq % Hkv == 0, "sink_decode_cpu: one query per row, D % 8 == 0");
  QsDecodeArgs a{};
  a.q = floats_of(q), a.qs = floats_of(qs), a.sink_k = floats_of(sink_k), a.sink_v = floats_of(sink_v);
  a.win_k = floats_of(win_k), a.win_v = floats_of(win_v), a.ks = floats_of(ks), a.kz = floats_of(kz);
  a.od = floats_of(od), a.vs = floats_of(vs), a.vz = floats_of(vz), a.sink_logits = floats_of(sink_logits);
  a.kc = T ? kc.data_ptr<uint8_t>() : nullptr, a.vc = T ? vc.data_ptr<uint8_t>() : nullptr;
  a.oi = oi.numel() ? oi.data_ptr() : nullptr, a.oi_bytes = static_cast<int32_t>(oi.element_size());
  a.vsym = vsym, a.B = B, a.Hq = Hq, a.Hkv = Hkv, a.D = D, a.S0 = sink_k.size(2), a.T = T, a.W = win_k.size(2);
  a.NGk = T ? ks.size(2) : 0, a.NOUT = oi.numel() ? oi.size(3) : 0;
  a.koff = koff, a.kgroup = kgroup, a.kbits = kbits, a.vbits = vbits, a.vgroup = vgroup;
  a.window = sliding_window, a.scale = static_cast<float>(scale), a.softcap = static_cast<float>(softcap);
  check_body(a, kc, vc, oi);
  const int64_t S = a.S0 + T + a.W;
  TORCH_CHECK(key_mask.numel() == 0 || key_mask.numel() == B * S, "sink_decode_cpu: key_mask must be [B, S]");
  TORCH_CHECK(key_mask.numel() == 0 || key_mask.scalar_type() == at::kBool, "sink_decode_cpu: key_mask must be bool");
  a.mask = key_mask.numel() ? reinterpret_cast<const uint8_t*>(key_mask.data_ptr<bool>()) : nullptr;
  auto out = at::empty({B, Hq, 1, D}, q.options().dtype(at::kFloat));
  a.out = out.data_ptr<float>();
  QsDecodeScratch none;
  const int64_t need = qs_decode_scratch(&none, nullptr, Hq / Hkv, S, D);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t bh0, int64_t bh1) {
    std::vector<float> scratch(need);
    kern.sink_decode(&a, bh0, bh1, scratch.data());
  });
  return out;
}
