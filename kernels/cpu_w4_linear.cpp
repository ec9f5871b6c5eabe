// W4A32 linear on the CPU straight from a QuantLinear's stored buffers (no converted copy).
//
// The spec is quantsink.weights.qmatmul.quant_linear_ref in float32: y = x_q @ ((c - zp) * s).T
// + x_o @ W_o.T + bias, for codes c packed two per byte (code 2j in the low nibble of byte j),
// fp16 scales s and uint8 zero points zp per (row, group of G input channels), and fp16
// outlier columns W_o. Arithmetic is fp32: (c - zp) is exact, each group's partial dot is
// scaled once. Several layers that read the same input (q/k/v, gate/up) are one call: x is
// gathered once. The loop over output rows is shared out with at::parallel_for (torch's
// threads). With AVX-512 two rows are read 16 bytes (32 codes) at a time, each byte's two
// nibbles multiplying the even / odd channels of x (x is split that way once per call).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

struct Layer {
  const uint8_t* codes; int64_t stride;  // bytes per row (4 * words)
  const c10::Half* scale; const uint8_t* zero; int64_t ngroups;
  const c10::Half* wo; const float* bias;
  int64_t N;
};

// x split for the kernel: xe[m][j] = x_q[m][2j], xh[m][j] = x_q[m][2j + 1] (zero past n_q),
// xo[m][j] = x_o[m][j] (zero past k, to a multiple of 16).
struct Input {
  std::vector<float> xe, xh, xo;
  int64_t M, half, kpad, k;
};

#ifdef __AVX512F__
// The 32 codes of 16 bytes minus the zero point: even codes (low nibbles), odd codes (high).
inline void codes32(const uint8_t* w, int64_t left, __m512 zp, __m512& lo, __m512& hi) {
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m128i b = left >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(w))
                               : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << left) - 1), w);
  lo = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low))), zp);
  hi = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low))), zp);
}

// Rows [n0, n1) of one layer for MB input rows starting at m0: y[m][n] (float, ld = N). NR
// output rows at a time share each load of x; even and odd codes have partial sums of their own,
// so 2 * NR * MB FMA chains run side by side.
template <int MB, int NR>
void rows_avx512(const Layer& L, const Input& in, int64_t m0, int64_t G, int64_t nq, int64_t n0, int64_t n1,
                 float* y) {
  const int64_t nchunks = (nq + 31) / 32, per_group = G / 32;
  const float* xe = in.xe.data() + m0 * in.half;
  const float* xh = in.xh.data() + m0 * in.half;
  for (int64_t n = n0; n + NR <= n1; n += NR) {
    __m512 acc[NR][MB];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < L.ngroups; ++g) {
      __m512 t[NR][MB][2], zp[NR];
      for (int r = 0; r < NR; ++r) {
        zp[r] = _mm512_set1_ps(static_cast<float>(L.zero[(n + r) * L.ngroups + g]));
        for (int m = 0; m < MB; ++m) t[r][m][0] = t[r][m][1] = _mm512_setzero_ps();
      }
      const int64_t c1 = std::min(nchunks, (g + 1) * per_group);
      for (int64_t c = g * per_group; c < c1; ++c) {
        __m512 lo[NR], hi[NR];
        for (int r = 0; r < NR; ++r)
          codes32(L.codes + (n + r) * L.stride + 16 * c, L.stride - 16 * c, zp[r], lo[r], hi[r]);
        for (int m = 0; m < MB; ++m) {
          const __m512 a = _mm512_loadu_ps(xe + m * in.half + 16 * c), b = _mm512_loadu_ps(xh + m * in.half + 16 * c);
          for (int r = 0; r < NR; ++r) {
            t[r][m][0] = _mm512_fmadd_ps(lo[r], a, t[r][m][0]);
            t[r][m][1] = _mm512_fmadd_ps(hi[r], b, t[r][m][1]);
          }
        }
      }
      for (int r = 0; r < NR; ++r) {
        const __m512 sc = _mm512_set1_ps(_cvtsh_ss(L.scale[(n + r) * L.ngroups + g].x));  // F16C
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(sc, _mm512_add_ps(t[r][m][0], t[r][m][1]), acc[r][m]);
      }
    }
    for (int64_t j = 0; j < in.k; j += 16) {  // fp16 outlier columns
      const __mmask16 mk = static_cast<__mmask16>(in.k - j >= 16 ? 0xFFFF : (1u << (in.k - j)) - 1);
      for (int r = 0; r < NR; ++r) {
        const __m512 wo = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, L.wo + (n + r) * in.k + j));
        for (int m = 0; m < MB; ++m)
          acc[r][m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(in.xo.data() + (m0 + m) * in.kpad + j), acc[r][m]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MB; ++m)
        y[(m0 + m) * L.N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + (L.bias ? L.bias[n + r] : 0.f);
  }
}

// All of [n0, n1): pairs of output rows, then the odd one out.
template <int MB>
void rows_block(const Layer& L, const Input& in, int64_t m0, int64_t G, int64_t nq, int64_t n0, int64_t n1,
                float* y) {
  const int64_t n_even = n0 + (n1 - n0) / 2 * 2;
  rows_avx512<MB, 2>(L, in, m0, G, nq, n0, n_even, y);
  rows_avx512<MB, 1>(L, in, m0, G, nq, n_even, n1, y);
}
#endif

// The same in plain C++ (hosts without AVX-512), one input row at a time.
void rows_plain(const Layer& L, const Input& in, int64_t m, int64_t G, int64_t nq, int64_t n0, int64_t n1,
                float* y) {
  const float* xe = in.xe.data() + m * in.half;
  const float* xh = in.xh.data() + m * in.half;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = L.codes + n * L.stride;
    float acc = 0.f;
    for (int64_t g = 0; g < L.ngroups; ++g) {
      const float zp = static_cast<float>(L.zero[n * L.ngroups + g]);
      float t = 0.f;
      const int64_t j1 = std::min((g + 1) * G, nq + (nq & 1)) / 2;
      for (int64_t j = g * G / 2; j < j1; ++j)
        t += (static_cast<float>(w[j] & 15) - zp) * xe[j] + (static_cast<float>(w[j] >> 4) - zp) * xh[j];
      acc += static_cast<float>(L.scale[n * L.ngroups + g]) * t;
    }
    for (int64_t j = 0; j < in.k; ++j) acc += static_cast<float>(L.wo[n * in.k + j]) * in.xo[m * in.kpad + j];
    y[m * L.N + n] = acc + (L.bias ? L.bias[n] : 0.f);
  }
}

template <typename T>
Input split_input(const T* x, int64_t M, int64_t in, const int64_t* gather, int64_t nq, int64_t k,
                  int64_t ngroups, int64_t G) {
  Input s;
  s.M = M, s.k = k, s.half = ngroups * G / 2, s.kpad = (k + 15) / 16 * 16;
  s.xe.assign(M * s.half, 0.f), s.xh.assign(M * s.half, 0.f), s.xo.assign(M * s.kpad, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * in;
    for (int64_t j = 0; j < nq; ++j) {
      const float v = static_cast<float>(xr[gather ? gather[j] : j]);
      ((j & 1) ? s.xh : s.xe)[m * s.half + j / 2] = v;
    }
    for (int64_t j = 0; j < k; ++j) s.xo[m * s.kpad + j] = static_cast<float>(xr[gather[nq + j]]);
  }
  return s;
}

void run_layer(const Layer& L, const Input& in, int64_t G, int64_t nq, float* y) {
  at::parallel_for(0, L.N, 64, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
#ifdef __AVX512F__
    if (G % 32 == 0) {
      for (; m + 4 <= in.M; m += 4) rows_block<4>(L, in, m, G, nq, n0, n1, y);
      if (in.M - m == 3) rows_block<3>(L, in, m, G, nq, n0, n1, y);
      if (in.M - m == 2) rows_block<2>(L, in, m, G, nq, n0, n1, y);
      if (in.M - m == 1) rows_block<1>(L, in, m, G, nq, n0, n1, y);
      m = in.M;
    }
#endif
    for (; m < in.M; ++m) rows_plain(L, in, m, G, nq, n0, n1, y);
  });
}

}  // namespace

// x: [M, in] float32 / bf16, contiguous. gather: int64 [n_q + k] (kept channels, then the
// outlier channels), or empty when x is used as is (k == 0, n_q == in). Per layer i: packed
// int32 [N_i, words], scale fp16 [N_i, groups], zero uint8 [N_i, groups], outlier weight fp16
// [N_i, k], bias float32 [N_i] or empty. Returns the layers' outputs [M, N_i] in x's dtype.
std::vector<at::Tensor> w4_linear(const at::Tensor& x, const at::Tensor& gather, int64_t nq, int64_t group_size,
                                  const std::vector<at::Tensor>& packed, const std::vector<at::Tensor>& scale,
                                  const std::vector<at::Tensor>& zero, const std::vector<at::Tensor>& outlier_w,
                                  const std::vector<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "w4_linear: x must be [M, in] on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "w4_linear: x must be float32 or bf16");
  TORCH_CHECK(group_size % 2 == 0 && !packed.empty(), "w4_linear: even group size, at least one layer");
  const int64_t M = x.size(0), in = x.size(1), G = group_size;
  const int64_t k = gather.numel() ? gather.numel() - nq : 0, ngroups = (nq + G - 1) / G;
  TORCH_CHECK(gather.numel() ? gather.scalar_type() == at::kLong : (nq == in), "w4_linear: bad gather index");
  const int64_t* gp = gather.numel() ? gather.data_ptr<int64_t>() : nullptr;
  const Input input = x.scalar_type() == at::kFloat
                          ? split_input(x.data_ptr<float>(), M, in, gp, nq, k, ngroups, G)
                          : split_input(x.data_ptr<c10::BFloat16>(), M, in, gp, nq, k, ngroups, G);
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < packed.size(); ++i) {
    const int64_t N = packed[i].size(0);
    TORCH_CHECK(packed[i].is_contiguous() && packed[i].scalar_type() == at::kInt &&
                    packed[i].size(1) * 8 >= nq && scale[i].is_contiguous() &&
                    scale[i].scalar_type() == at::kHalf && scale[i].size(0) == N && scale[i].size(1) == ngroups &&
                    zero[i].is_contiguous() && zero[i].scalar_type() == at::kByte && zero[i].sizes() == scale[i].sizes() &&
                    (k == 0 || (outlier_w[i].is_contiguous() && outlier_w[i].scalar_type() == at::kHalf &&
                                outlier_w[i].size(0) == N && outlier_w[i].size(1) == k)) &&
                    (bias[i].numel() == 0 || (bias[i].scalar_type() == at::kFloat && bias[i].numel() == N)),
                "w4_linear: layer ", i, " buffers do not match a 4-bit QuantLinear of this input");
    const Layer L{reinterpret_cast<const uint8_t*>(packed[i].data_ptr<int32_t>()), packed[i].size(1) * 4,
                  reinterpret_cast<const c10::Half*>(scale[i].data_ptr<at::Half>()), zero[i].data_ptr<uint8_t>(),
                  ngroups, k ? reinterpret_cast<const c10::Half*>(outlier_w[i].data_ptr<at::Half>()) : nullptr,
                  bias[i].numel() ? bias[i].data_ptr<float>() : nullptr, N};
    auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
    run_layer(L, input, G, nq, y.data_ptr<float>());
    outs.push_back(x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type()));
  }
  return outs;
}
