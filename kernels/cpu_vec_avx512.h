// The vector type of the avx512 level: 16 floats in a zmm register (AVX-512F/BW/VL + F16C).
//
// Included inside the anonymous namespace of cpu_isa_avx512.cpp (after <immintrin.h>); every
// vector header defines the same names (see cpu_vec_portable.h for the plain meaning of each),
// and the kernels (cpu_kern_*.h) are written once against them.

constexpr int W = 16;
constexpr int W4_ACC = 8;    // W4A32: output rows x input rows held in registers at once
constexpr int INT8_ACC = 16;  // int8 rows: the same for the int8 product
using vf = __m512;

inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline float vmaxall(vf v) { return _mm512_reduce_max_ps(v); }

// ((p[j] >> shift) & mask) as float, j < W.
inline vf vbits(const uint8_t* p, int shift, int mask) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i c = _mm_and_si128(_mm_srl_epi16(b, _mm_cvtsi32_si128(shift)), _mm_set1_epi8(static_cast<char>(mask)));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c));
}

// W bytes of two 4-bit codes: lo = low nibbles - zp, hi = high nibbles - zp (exact). Only the
// first `left` bytes are read (a masked load at the end of a row).
inline void vnibbles(const uint8_t* p, int64_t left, vf zp, vf& lo, vf& hi) {
  const __m128i b = left >= W ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                              : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << left) - 1), p);
  const __m512i c = _mm512_cvtepu8_epi32(b);
  const __m512i m = _mm512_set1_epi32(15);
  lo = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(c, m)), zp);
  hi = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4)), zp);
}

inline vf vload_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vf vload_f16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vf vload_bf16(const uint16_t* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

// Pieces of exp (cpu_kern_common.h): round to nearest, 2^n for integral n in [-126, 127],
// and keep a where x >= t (0 elsewhere).
inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline vf vkeep_ge(vf x, float t, vf a) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset1(t), _CMP_GE_OQ), a); }

// out lane i = the sum of the W lanes of v[i], for W vectors (one transpose-and-add tree).
inline vf vhsum(const vf* v) {
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
