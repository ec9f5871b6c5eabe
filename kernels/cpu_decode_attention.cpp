// Decode attention over the sink-aware cache on the CPU: fp sinks + packed int2/4/8 body + fp window.
//
// The spec is quantsink.kv.attention.decode_attention_ref (one query per row, Lq == 1). Each
// (sequence, KV head) is one OpenMP task; its g query heads are processed together so every
// packed key / value byte is read once. Keys are per channel in groups of `kgroup` token slots
// (the first `koff` slots of the first group are phantoms): the scale folds into the query,
// q . k = sum_d (q_d s_d) code_d + sum_d q_d z_d. Values are per token in groups of `vgroup`
// channels: p v = sum_d (p s_t) code_d + p z_t. Planar codes: byte j of a row holds channel
// j + i * P in bits [i * bits, (i + 1) * bits) for i < 8 / bits (P = D * bits / 8).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <int BITS>
inline void unpack_row(const uint8_t* __restrict src, float* __restrict dst, int64_t D) {
  constexpr int PER = 8 / BITS;
  constexpr int MASK = (1 << BITS) - 1;
  const int64_t P = D / PER;
  for (int i = 0; i < PER; ++i) {
    float* out = dst + i * P;
#pragma omp simd
    for (int64_t j = 0; j < P; ++j) out[j] = static_cast<float>((src[j] >> (i * BITS)) & MASK);
  }
}

inline void unpack(const uint8_t* src, float* dst, int64_t D, int bits) {
  if (bits == 4) unpack_row<4>(src, dst, D);
  else if (bits == 2) unpack_row<2>(src, dst, D);
  else unpack_row<8>(src, dst, D);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

struct Body {
  const uint8_t* kc; const float* ks; const float* kz; const uint8_t* oi; const float* od;
  const uint8_t* vc; const float* vs; const float* vz;
  int64_t T, NGk, NOUT, koff, kgroup, kbits, vbits, vgroup;
};

// Scores of the g rows over the packed body keys of one (b, h): s[r * S + S0 + t].
// DC: head_dim known at compile time (64, 128), 0 for any other.
template <int DC>
void body_scores(const Body& bd, int64_t bh, const float* q, int64_t g, int64_t Dr, float* s, int64_t S,
                 int64_t S0, float* qg, float* bias, float* row) {
  const int64_t D = DC ? DC : Dr;
  const int64_t kw = D * bd.kbits / 8;
  for (int64_t n = 0; n < bd.NGk; ++n) {
    const float* sc = bd.ks + (bh * bd.NGk + n) * D;
    const float* zc = bd.kz + (bh * bd.NGk + n) * D;
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
    for (int64_t t = t0; t < t1; ++t) {
      unpack(bd.kc + (bh * bd.T + t) * kw, row, D, bd.kbits);
      for (int64_t r = 0; r < g; ++r) s[r * S + S0 + t] = dot(qg + r * D, row, D) + bias[r];
    }
    for (int64_t j = 0; j < bd.NOUT; ++j) {  // fp16 outliers: add q_d * delta at their slots
      const uint8_t* slot = bd.oi + ((bh * bd.NGk + n) * bd.NOUT + j) * D;
      const float* delta = bd.od + ((bh * bd.NGk + n) * bd.NOUT + j) * D;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t t = n * bd.kgroup + slot[d] - bd.koff;
        if (t < t0 || t >= t1) continue;
        for (int64_t r = 0; r < g; ++r) s[r * S + S0 + t] += q[r * D + d] * delta[d];
      }
    }
  }
}

// acc[r * D + d] += sum_t p[r, S0 + t] v[t, d] over the packed body values of one (b, h).
template <int DC>
void body_values(const Body& bd, int64_t bh, const float* p, int64_t g, int64_t Dr, int64_t S, int64_t S0,
                 float* acc, float* row) {
  const int64_t D = DC ? DC : Dr;
  const int64_t vw = D * bd.vbits / 8, ngv = D / bd.vgroup;
  std::vector<float> zacc(g * ngv, 0.f);  // sum_t p z per (row, group): added once at the end
  for (int64_t t = 0; t < bd.T; ++t) {
    unpack(bd.vc + (bh * bd.T + t) * vw, row, D, bd.vbits);
    const float* sc = bd.vs + (bh * bd.T + t) * ngv;
    const float* zc = bd.vz + (bh * bd.T + t) * ngv;
    for (int64_t r = 0; r < g; ++r) {
      const float pr = p[r * S + S0 + t];
      for (int64_t c = 0; c < ngv; ++c) {
        float* __restrict a = acc + r * D + c * bd.vgroup;
        const float* __restrict x = row + c * bd.vgroup;
        const float ps = pr * sc[c];
        zacc[r * ngv + c] += pr * zc[c];
#pragma omp simd
        for (int64_t d = 0; d < bd.vgroup; ++d) a[d] += ps * x[d];
      }
    }
  }
  for (int64_t r = 0; r < g; ++r)
    for (int64_t c = 0; c < ngv; ++c)
      for (int64_t d = 0; d < bd.vgroup; ++d) acc[r * D + c * bd.vgroup + d] += zacc[r * ngv + c];
}

// exp(x) for x <= 0 (softmax after subtracting the row maximum): Cody-Waite range reduction and
// a degree-6 polynomial (relative error < 2e-7), 0 below -87 (and for -inf); plain arithmetic, so the
// loop vectorises (libm's scalar exp would not).
inline float exp_nonpos(float x) {
  const float xc = std::max(x, -87.f);
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.f ? 0.f : p * scale;
}

// Softmax of each row of s [g, S] in place (masked entries are -inf), with an optional learned
// sink logit per row in the denominator; a fully masked row gives zeros.
void softmax_rows(float* s, int64_t g, int64_t S, const float* sink) {
  for (int64_t r = 0; r < g; ++r) {
    float* x = s + r * S;
    float m = sink ? sink[r] : -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < S; ++j) m = std::max(m, x[j]);
    if (m == -std::numeric_limits<float>::infinity()) {
      std::fill(x, x + S, 0.f);
      continue;
    }
    float sum = sink ? std::exp(sink[r] - m) : 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < S; ++j) {
      x[j] = exp_nonpos(x[j] - m);
      sum += x[j];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t j = 0; j < S; ++j) x[j] *= inv;
  }
}

}  // namespace

// q: [B, Hq, D] float (already multiplied by the attention scale); qs: the same for the sink
// region (or q). Dense regions [B, Hkv, n, D] float. Body tensors as in PackedBlock, scales and
// zeros (symmetric values: the implied zero) and outlier corrections as float. key_mask: [B, S] bool or empty. sink_logits: [Hq]
// float or empty. sliding_window <= 0: none. softcap <= 0: none. Returns [B, Hq, D] float.
torch::Tensor sink_decode_cpu(torch::Tensor q, torch::Tensor qs, torch::Tensor sink_k, torch::Tensor sink_v,
                              torch::Tensor kc, torch::Tensor ks, torch::Tensor kz, torch::Tensor oi,
                              torch::Tensor od, torch::Tensor vc, torch::Tensor vs, torch::Tensor vz,
                              torch::Tensor win_k, torch::Tensor win_v, torch::Tensor key_mask,
                              torch::Tensor sink_logits, int64_t koff, int64_t kgroup, int64_t kbits,
                              int64_t vbits, int64_t vgroup, int64_t sliding_window, double softcap) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = sink_k.size(1), g = Hq / Hkv;
  const int64_t S0 = sink_k.size(2), W = win_k.size(2), T = kc.numel() ? kc.size(2) : 0;
  const int64_t S = S0 + T + W;
  auto out = torch::zeros({B, Hq, D}, q.options());
  Body bd{kc.data_ptr<uint8_t>(), ks.data_ptr<float>(), kz.data_ptr<float>(),
          oi.numel() ? oi.data_ptr<uint8_t>() : nullptr, od.numel() ? od.data_ptr<float>() : nullptr,
          vc.data_ptr<uint8_t>(), vs.data_ptr<float>(), vz.data_ptr<float>(),
          T, T ? ks.size(2) : 0, oi.numel() ? oi.size(3) : 0, koff, kgroup, kbits, vbits, vgroup};
  const float* qp = q.data_ptr<float>();
  const float* qsp = qs.data_ptr<float>();
  const float* skp = sink_k.data_ptr<float>();
  const float* svp = sink_v.data_ptr<float>();
  const float* wkp = win_k.data_ptr<float>();
  const float* wvp = win_v.data_ptr<float>();
  const bool* mask = key_mask.numel() ? key_mask.data_ptr<bool>() : nullptr;
  const float* sl = sink_logits.numel() ? sink_logits.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float cap = static_cast<float>(softcap);
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    const int64_t b = bh / Hkv, h = bh % Hkv;
    std::vector<float> s(g * S), qg(g * D), bias(g), row(D), acc(g * D, 0.f);
    const float* qrow = qp + (b * Hq + h * g) * D;
    const float* qsrow = qsp + (b * Hq + h * g) * D;
    for (int64_t r = 0; r < g; ++r) {
      for (int64_t j = 0; j < S0; ++j) s[r * S + j] = dot(qsrow + r * D, skp + (bh * S0 + j) * D, D);
      for (int64_t j = 0; j < W; ++j) s[r * S + S0 + T + j] = dot(qrow + r * D, wkp + (bh * W + j) * D, D);
    }
    if (T && D == 64) body_scores<64>(bd, bh, qrow, g, D, s.data(), S, S0, qg.data(), bias.data(), row.data());
    else if (T && D == 128) body_scores<128>(bd, bh, qrow, g, D, s.data(), S, S0, qg.data(), bias.data(), row.data());
    else if (T) body_scores<0>(bd, bh, qrow, g, D, s.data(), S, S0, qg.data(), bias.data(), row.data());
    for (int64_t r = 0; r < g; ++r) {
      for (int64_t j = 0; j < S; ++j) {
        float& x = s[r * S + j];
        if (cap > 0.f) x = cap * std::tanh(x / cap);
        const bool out_of_window = sliding_window > 0 && j >= S0 && j <= S - 1 - sliding_window;
        if (out_of_window || (mask && !mask[b * S + j])) x = -std::numeric_limits<float>::infinity();
      }
    }
    softmax_rows(s.data(), g, S, sl ? sl + h * g : nullptr);
    for (int64_t r = 0; r < g; ++r) {
      for (int64_t j = 0; j < S0; ++j) axpy(s[r * S + j], svp + (bh * S0 + j) * D, acc.data() + r * D, D);
      for (int64_t j = 0; j < W; ++j)
        axpy(s[r * S + S0 + T + j], wvp + (bh * W + j) * D, acc.data() + r * D, D);
    }
    if (T && D == 64) body_values<64>(bd, bh, s.data(), g, D, S, S0, acc.data(), row.data());
    else if (T && D == 128) body_values<128>(bd, bh, s.data(), g, D, S, S0, acc.data(), row.data());
    else if (T) body_values<0>(bd, bh, s.data(), g, D, S, S0, acc.data(), row.data());
    std::copy(acc.begin(), acc.end(), op + (b * Hq + h * g) * D);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sink_decode_cpu", &sink_decode_cpu, "decode attention over the sink-aware cache (CPU)");
}
