// Decode attention over the sink-aware cache on the CPU: fp sinks + packed int2/4/8 body + fp window.
//
// The spec is quantsink.kv.attention.decode_attention_ref (one query per row, Lq == 1). Each
// (sequence, KV head) is one task of at::parallel_for (torch's threads); its g query heads are processed together so every
// packed key / value byte is read once. Rows are handled in tiles of 16 tokens converted to
// float: keys as codes (per channel, in groups of `kgroup` token slots, the first `koff` slots
// of the first group being phantoms; the group's scale folds into the query,
// q . k = sum_d (q_d s_d) code_d + sum_d q_d z_d), values dequantized (per token, in groups of
// `vgroup` channels). Planar codes: byte j of a row holds channel j + i * P in bits
// [i * bits, (i + 1) * bits) for i < 8 / bits (P = D * bits / 8). Dense regions, scales and
// zeros are read as stored (fp16, bf16 or fp32); all arithmetic is fp32. With AVX-512 the
// 16 dot products of a tile are reduced together (one transpose-and-add tree), and the value
// accumulators of head_dim 64 / 128 stay in registers.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_simd.h"

namespace {

using qs_simd::accumulate;
using qs_simd::dots;
using qs_simd::NEG_INF;
using qs_simd::softmax_rows;
using qs_simd::TILE;
using qs_simd::unpack;

// A float tensor of any of fp32 / fp16 / bf16, read as float.
struct FRows {
  const void* p = nullptr;
  at::ScalarType t = at::kFloat;
  inline float at(int64_t i) const {
    if (t == at::kFloat) return static_cast<const float*>(p)[i];
    if (t == at::kHalf) return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  }
  // dst[0:n] = float(src[off:off + n])
  void load(int64_t off, int64_t n, float* __restrict dst) const {
    if (t == at::kFloat) {
      std::memcpy(dst, static_cast<const float*>(p) + off, n * sizeof(float));
      return;
    }
    int64_t i = 0;
#ifdef __AVX512F__
    if (t == at::kHalf) {  // F16C conversion, 16 at a time
      const uint16_t* src = static_cast<const uint16_t*>(p) + off;
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
    }
#endif
    for (; i < n; ++i) dst[i] = at(off + i);
  }
};

FRows rows_of(const torch::Tensor& x) {  // x: contiguous
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sink_decode_cpu: float tensors must be float32, float16 or bfloat16, got ", x.scalar_type());
  return FRows{x.numel() ? x.data_ptr() : nullptr, x.scalar_type()};
}

// Round v to the storage dtype st (the implied zero of a symmetric block is stored-dtype).
inline float round_to(float v, at::ScalarType st) {
  if (st == at::kHalf) return static_cast<float>(c10::Half(v));
  if (st == at::kBFloat16) return static_cast<float>(c10::BFloat16(v));
  return v;
}

struct Body {
  const uint8_t* kc; FRows ks, kz; const uint8_t* oi; FRows od;
  const uint8_t* vc; FRows vs, vz;
  bool vsym;
  int64_t T, NGk, NOUT, koff, kgroup, kbits, vbits, vgroup;
};

// Scores of the g rows over the packed body keys of one (b, h): s[r * S + t].
template <int DC>
void body_scores(const Body& bd, int64_t bh, const float* q, int64_t g, int64_t Dr, float* s, int64_t S,
                 float* tile) {
  const int64_t D = DC ? DC : Dr;
  const int64_t kw = D * bd.kbits / 8;
  std::vector<float> qg(g * D), bias(g), sc(D), zc(D);
  for (int64_t n = 0; n < bd.NGk; ++n) {
    bd.ks.load((bh * bd.NGk + n) * D, D, sc.data());
    bd.kz.load((bh * bd.NGk + n) * D, D, zc.data());
    for (int64_t r = 0; r < g; ++r) {
      float b = 0.f;
#pragma omp simd reduction(+ : b)
      for (int64_t d = 0; d < D; ++d) {
        qg[r * D + d] = q[r * D + d] * sc[d];
        b += q[r * D + d] * zc[d];
      }
      bias[r] = b;
    }
    const int64_t t0 = std::max<int64_t>(0, n * bd.kgroup - bd.koff);
    const int64_t t1 = std::min<int64_t>(bd.T, (n + 1) * bd.kgroup - bd.koff);
    for (int64_t t = t0; t < t1; t += TILE) {
      const int64_t nt = std::min<int64_t>(TILE, t1 - t);
      for (int64_t j = 0; j < nt; ++j) unpack(bd.kc + (bh * bd.T + t + j) * kw, tile + j * D, D, bd.kbits);
      dots<DC>(qg.data(), g, tile, nt, D, s + t, S, bias.data());
    }
    for (int64_t j = 0; j < bd.NOUT; ++j) {  // fp16 outliers: add q_d * delta at their slots
      const int64_t base = ((bh * bd.NGk + n) * bd.NOUT + j) * D;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t t = n * bd.kgroup + bd.oi[base + d] - bd.koff;
        if (t < t0 || t >= t1) continue;
        const float delta = bd.od.at(base + d);
        for (int64_t r = 0; r < g; ++r) s[r * S + t] += q[r * D + d] * delta;
      }
    }
  }
}

// acc[r * D + d] += sum_t p[r * S + t] v[t, d] over the packed body values of one (b, h).
// One value group per row (vgroup == D): the scale folds into the probability and the zero
// is summed once, sum_t p v = sum_t (p s_t) code_t + (sum_t p z_t); else rows are dequantized.
template <int DC>
void body_values(const Body& bd, int64_t bh, const float* p, int64_t g, int64_t Dr, int64_t S, float* acc,
                 float* tile) {
  const int64_t D = DC ? DC : Dr;
  const int64_t vw = D * bd.vbits / 8, ngv = D / bd.vgroup;
  const float half_range = -static_cast<float>((1 << bd.vbits) - 1) / 2.f;
  std::vector<float> w(g * TILE), zsum(g, 0.f);
  for (int64_t t = 0; t < bd.T; t += TILE) {
    const int64_t nt = std::min<int64_t>(TILE, bd.T - t);
    for (int64_t j = 0; j < nt; ++j) {
      float* row = tile + j * D;
      unpack(bd.vc + (bh * bd.T + t + j) * vw, row, D, bd.vbits);
      const int64_t at = (bh * bd.T + t + j) * ngv;
      for (int64_t c = 0; c < ngv; ++c) {
        const float sc = bd.vs.at(at + c);
        const float z = bd.vsym ? round_to(sc * half_range, bd.vs.t) : bd.vz.at(at + c);
        if (ngv == 1) {
          for (int64_t r = 0; r < g; ++r) {
            const float pr = p[r * S + t + j];
            w[r * TILE + j] = pr * sc;
            zsum[r] += pr * z;
          }
          continue;
        }
        float* __restrict x = row + c * bd.vgroup;
#pragma omp simd
        for (int64_t d = 0; d < bd.vgroup; ++d) x[d] = x[d] * sc + z;
      }
    }
    if (ngv == 1) accumulate<DC>(w.data(), g, TILE, tile, nt, D, acc);
    else accumulate<DC>(p + t, g, S, tile, nt, D, acc);
  }
  for (int64_t r = 0; r < g; ++r)
    for (int64_t d = 0; d < D; ++d) acc[r * D + d] += zsum[r];
}

// Scores / value sums over a dense region [n, D] of one (b, h), in tiles of 16 rows.
template <int DC>
void dense_scores(const FRows& k, int64_t off, int64_t n, const float* q, int64_t g, int64_t D, float* s,
                  int64_t S, float* tile) {
  for (int64_t j = 0; j < n; j += TILE) {
    const int64_t nt = std::min<int64_t>(TILE, n - j);
    k.load((off + j) * D, nt * D, tile);
    dots<DC>(q, g, tile, nt, D, s + j, S, nullptr);
  }
}

template <int DC>
void dense_values(const FRows& v, int64_t off, int64_t n, const float* p, int64_t g, int64_t D, int64_t S,
                  float* acc, float* tile) {
  for (int64_t j = 0; j < n; j += TILE) {
    const int64_t nt = std::min<int64_t>(TILE, n - j);
    v.load((off + j) * D, nt * D, tile);
    accumulate<DC>(p + j, g, S, tile, nt, D, acc);
  }
}

// Softcap, sliding window and key mask on the scores of one (b, h) (only what is asked for).
void restrict_scores(float* s, int64_t g, int64_t S, int64_t S0, float cap, int64_t window, const bool* mask) {
  for (int64_t r = 0; r < g; ++r) {
    float* x = s + r * S;
    if (cap > 0.f)
      for (int64_t j = 0; j < S; ++j) x[j] = cap * std::tanh(x[j] / cap);
    if (window > 0)  // body / window keys j <= S - 1 - window are out of the query's window
      for (int64_t j = S0; j <= S - 1 - window; ++j) x[j] = NEG_INF;
    if (mask)
      for (int64_t j = 0; j < S; ++j)
        if (!mask[j]) x[j] = NEG_INF;
  }
}

struct Dense {
  FRows sk, sv, wk, wv;
  int64_t S0, W;
};

// Attention of the g query rows q (scaled, float) of one (b, h); writes out [g, D].
template <int DC>
void attend_head(const Dense& dn, const Body& bd, int64_t bh, const float* q, const float* qs, int64_t g,
                 int64_t Dr, float cap, int64_t window, const bool* mask, const float* sink, float* out) {
  const int64_t D = DC ? DC : Dr, S0 = dn.S0, T = bd.T, W = dn.W, S = S0 + T + W;
  std::vector<float> s(g * S), tile(TILE * D);
  std::fill(out, out + g * D, 0.f);
  dense_scores<DC>(dn.sk, bh * S0, S0, qs, g, D, s.data(), S, tile.data());
  if (T) body_scores<DC>(bd, bh, q, g, D, s.data() + S0, S, tile.data());
  dense_scores<DC>(dn.wk, bh * W, W, q, g, D, s.data() + S0 + T, S, tile.data());
  if (cap > 0.f || window > 0 || mask) restrict_scores(s.data(), g, S, S0, cap, window, mask);
  softmax_rows(s.data(), g, S, sink);
  dense_values<DC>(dn.sv, bh * S0, S0, s.data(), g, D, S, out, tile.data());
  if (T) body_values<DC>(bd, bh, s.data() + S0, g, D, S, out, tile.data());
  dense_values<DC>(dn.wv, bh * W, W, s.data() + S0 + T, g, D, S, out, tile.data());
}

}  // namespace

// q, qs: [B, Hq, 1, D] (qs: the query of the sink region). Dense regions [B, Hkv, n, D]. Body
// tensors as in PackedBlock (vz empty and vsym: symmetric values, implied zero). key_mask:
// [B, S] bool or empty. sink_logits: [Hq] or empty. sliding_window <= 0: none. softcap <= 0:
// none. Float tensors may be fp32, fp16 or bf16. Returns [B, Hq, 1, D] float32.
torch::Tensor sink_decode_cpu(torch::Tensor q, torch::Tensor qs, torch::Tensor sink_k, torch::Tensor sink_v,
                              torch::Tensor kc, torch::Tensor ks, torch::Tensor kz, torch::Tensor oi,
                              torch::Tensor od, torch::Tensor vc, torch::Tensor vs, torch::Tensor vz,
                              torch::Tensor win_k, torch::Tensor win_v, torch::Tensor key_mask,
                              torch::Tensor sink_logits, int64_t koff, int64_t kgroup, int64_t kbits,
                              int64_t vbits, int64_t vgroup, bool vsym, double scale, int64_t sliding_window,
                              double softcap) {
  for (torch::Tensor* t : {&q, &qs, &sink_k, &sink_v, &kc, &ks, &kz, &oi, &od, &vc, &vs, &vz, &win_k, &win_v,
                           &key_mask, &sink_logits})
    *t = t->contiguous();  // a no-op for the cache's own tensors; evicted bodies are slices
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = sink_k.size(1), g = Hq / Hkv;
  const int64_t T = kc.numel() ? kc.size(2) : 0;
  TORCH_CHECK(q.size(2) == 1 && D % 8 == 0 && Hq % Hkv == 0, "sink_decode_cpu: one query per row");
  const Dense dn{rows_of(sink_k), rows_of(sink_v), rows_of(win_k), rows_of(win_v), sink_k.size(2), win_k.size(2)};
  const Body bd{T ? kc.data_ptr<uint8_t>() : nullptr, rows_of(ks), rows_of(kz),
                oi.numel() ? oi.data_ptr<uint8_t>() : nullptr, rows_of(od),
                T ? vc.data_ptr<uint8_t>() : nullptr, rows_of(vs), rows_of(vz), vsym,
                T, T ? ks.size(2) : 0, oi.numel() ? oi.size(3) : 0, koff, kgroup, kbits, vbits, vgroup};
  const FRows qr = rows_of(q), qsr = rows_of(qs), slr = rows_of(sink_logits);
  const int64_t S = dn.S0 + T + dn.W;
  TORCH_CHECK(key_mask.numel() == 0 || key_mask.numel() == B * S, "sink_decode_cpu: key_mask must be [B, S]");
  const bool* mask = key_mask.numel() ? key_mask.data_ptr<bool>() : nullptr;
  auto out = torch::empty({B, Hq, 1, D}, q.options().dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  const float cap = static_cast<float>(softcap), sc = static_cast<float>(scale);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t bh0, int64_t bh1) {
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / Hkv, h = bh % Hkv;
    std::vector<float> qf(g * D), qsf(g * D), sink(g);
    qr.load((b * Hq + h * g) * D, g * D, qf.data());
    qsr.load((b * Hq + h * g) * D, g * D, qsf.data());
    for (int64_t i = 0; i < g * D; ++i) qf[i] *= sc, qsf[i] *= sc;
    if (slr.p) slr.load(h * g, g, sink.data());
    const bool* mrow = mask ? mask + b * S : nullptr;
    float* o = op + (b * Hq + h * g) * D;
    const float* sp = slr.p ? sink.data() : nullptr;
    if (D == 64) attend_head<64>(dn, bd, bh, qf.data(), qsf.data(), g, D, cap, sliding_window, mrow, sp, o);
    else if (D == 128) attend_head<128>(dn, bd, bh, qf.data(), qsf.data(), g, D, cap, sliding_window, mrow, sp, o);
    else attend_head<0>(dn, bd, bh, qf.data(), qsf.data(), g, D, cap, sliding_window, mrow, sp, o);
  }
  });
  return out;
}

// cpu_w4_linear.cpp and cpu_int4_linear.cpp (the same extension)
std::vector<at::Tensor> w4_linear(const at::Tensor& x, const at::Tensor& gather, int64_t nq, int64_t group_size,
                                  const std::vector<at::Tensor>& packed, const std::vector<at::Tensor>& scale,
                                  const std::vector<at::Tensor>& zero, const std::vector<at::Tensor>& outlier_w,
                                  const std::vector<at::Tensor>& bias);
at::Tensor int4pack_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                           const at::Tensor& gather, int64_t pad, const at::Tensor& outlier_weight_t,
                           const at::Tensor& bias, int64_t group_size, int64_t out_features);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sink_decode_cpu", &sink_decode_cpu, "decode attention over the sink-aware cache (CPU)");
  m.def("w4_linear", &w4_linear, "4-bit QuantLinear layers sharing an input, from their stored buffers (CPU)");
  m.def("int4pack_linear", &int4pack_linear, "a QuantLinear through torch's int4pack kernel (CPU)");
}
