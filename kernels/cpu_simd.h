// Vector building blocks of the CPU decode-attention kernel (cpu_decode_attention.cpp).
//
// Each helper has a plain C++ loop; with AVX-512 (the build passes -mavx512f on such CPUs) the
// hot shapes take explicit intrinsics: planar code unpacking, 16 dot products reduced by one
// transpose-and-add tree, value accumulators held in registers, and a vector softmax.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace qs_simd {

constexpr int64_t TILE = 16;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// dst[0:D] = the D codes of a planar row (byte j holds code j + i * P at bits [i * BITS, ...)).
template <int BITS>
inline void unpack_row(const uint8_t* __restrict src, float* __restrict dst, int64_t D) {
  constexpr int PER = 8 / BITS;
  constexpr int MASK = (1 << BITS) - 1;
  const int64_t P = D / PER;
  int64_t j0 = 0;
#ifdef __AVX512F__
  const __m128i m = _mm_set1_epi8(static_cast<char>(MASK));
  for (; j0 + 16 <= P; j0 += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j0));
    for (int i = 0; i < PER; ++i) {
      const __m128i c = PER == 1 ? b : _mm_and_si128(_mm_srli_epi16(b, i * BITS), m);
      _mm512_storeu_ps(dst + i * P + j0, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c)));
    }
  }
#endif
  for (int i = 0; i < PER; ++i)
    for (int64_t j = j0; j < P; ++j) dst[i * P + j] = static_cast<float>((src[j] >> (i * BITS)) & MASK);
}

inline void unpack(const uint8_t* src, float* dst, int64_t D, int64_t bits) {
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

#ifdef __AVX512F__
// out[i] = sum of the 16 lanes of v[i], for 16 vectors (one transpose-and-add tree).
inline __m512 hsum16(const __m512* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xdd));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xdd));
}
#endif

// s[r * S + j] = q_r . rows[j] + bias[r] for j < n (rows: a float tile [n, D]; bias may be null).
template <int DC>
void dots(const float* q, int64_t g, const float* rows, int64_t n, int64_t Dr, float* s, int64_t S,
          const float* bias) {
  const int64_t D = DC ? DC : Dr;
#ifdef __AVX512F__
  if (DC > 0 && DC % 16 == 0 && n == TILE) {
    for (int64_t r = 0; r < g; ++r) {
      __m512 v[TILE];
      for (int64_t j = 0; j < TILE; ++j) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t c = 0; c < D; c += 16)
          a = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * D + c), _mm512_loadu_ps(rows + j * D + c), a);
        v[j] = a;
      }
      __m512 out = hsum16(v);
      if (bias) out = _mm512_add_ps(out, _mm512_set1_ps(bias[r]));
      _mm512_storeu_ps(s + r * S, out);
    }
    return;
  }
#endif
  for (int64_t r = 0; r < g; ++r)
    for (int64_t j = 0; j < n; ++j) s[r * S + j] = dot(q + r * D, rows + j * D, D) + (bias ? bias[r] : 0.f);
}

// acc[r * D + d] += sum_{j < n} w[r * ws + j] rows[j * D + d].
template <int DC>
void accumulate(const float* w, int64_t g, int64_t ws, const float* rows, int64_t n, int64_t Dr, float* acc) {
  const int64_t D = DC ? DC : Dr;
#ifdef __AVX512F__
  if (DC == 64 || DC == 128) {
    constexpr int C = DC / 16 > 0 ? DC / 16 : 1;
    for (int64_t r = 0; r < g; ++r) {
      __m512 a[C];
      for (int c = 0; c < C; ++c) a[c] = _mm512_loadu_ps(acc + r * D + 16 * c);
      for (int64_t j = 0; j < n; ++j) {
        const __m512 x = _mm512_set1_ps(w[r * ws + j]);
        for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(x, _mm512_loadu_ps(rows + j * D + 16 * c), a[c]);
      }
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + r * D + 16 * c, a[c]);
    }
    return;
  }
#endif
  for (int64_t r = 0; r < g; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const float x = w[r * ws + j];
      float* __restrict a = acc + r * D;
      const float* __restrict v = rows + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += x * v[d];
    }
}

// exp(x) for x <= 0 (softmax after subtracting the row maximum): Cody-Waite range reduction and
// a degree-6 polynomial (relative error < 2e-7), 0 below -87 (and for -inf).
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

#ifdef __AVX512F__
inline __m512 exp_nonpos(__m512 x) {  // the same polynomial, 16 lanes
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  return _mm512_maskz_mul_ps(live, p, _mm512_castsi512_ps(e));
}
#endif

// Softmax of each row of s [g, S] in place (masked entries are -inf), with an optional learned
// sink logit per row in the denominator; a fully masked row gives zeros.
inline void softmax_rows(float* s, int64_t g, int64_t S, const float* sink) {
  for (int64_t r = 0; r < g; ++r) {
    float* x = s + r * S;
    float m = sink ? sink[r] : NEG_INF;
    int64_t j = 0;
#ifdef __AVX512F__
    __m512 vm = _mm512_set1_ps(m);
    for (; j + 16 <= S; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + j));
    m = _mm512_reduce_max_ps(vm);
#endif
    for (; j < S; ++j) m = std::max(m, x[j]);
    if (m == NEG_INF) {
      std::fill(x, x + S, 0.f);
      continue;
    }
    float sum = sink ? std::exp(sink[r] - m) : 0.f;
    j = 0;
#ifdef __AVX512F__
    __m512 vs = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m);
    for (; j + 16 <= S; j += 16) {
      const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(x + j), mv));
      _mm512_storeu_ps(x + j, e);
      vs = _mm512_add_ps(vs, e);
    }
    sum += _mm512_reduce_add_ps(vs);
#endif
    for (; j < S; ++j) {
      x[j] = exp_nonpos(x[j] - m);
      sum += x[j];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t i = 0; i < S; ++i) x[i] *= inv;
  }
}

}  // namespace qs_simd
