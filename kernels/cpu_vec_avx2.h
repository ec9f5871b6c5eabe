// The vector type of the avx2 level: 8 floats in a ymm register (AVX2 + FMA + F16C, x86-64-v3).
//
// Included inside the anonymous namespace of cpu_isa_avx2.cpp (after <immintrin.h>); the same
// names as cpu_vec_portable.h, which gives the plain meaning of each.

constexpr int W = 8;
constexpr int W4_ACC = 4;   // 16 ymm registers: 4 (row, input) accumulator sets of 3 vectors
constexpr int INT8_ACC = 8;
using vf = __m256;

inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c

inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float vmaxall(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline __m128i load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }

// ((p[j] >> shift) & mask) as float, j < W.
inline vf vbits(const uint8_t* p, int shift, int mask) {
  const __m256i c = _mm256_cvtepu8_epi32(load8(p));
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(c, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(mask)));
}

// W bytes of two 4-bit codes: lo = low nibbles - zp, hi = high nibbles - zp (exact). Only the
// first `left` bytes are read: a row's last bytes are copied to a zeroed local buffer.
inline void vnibbles(const uint8_t* p, int64_t left, vf zp, vf& lo, vf& hi) {
  __m128i b;
  if (left >= W) {
    b = load8(p);
  } else {
    uint8_t tail[W] = {0};
    memcpy(tail, p, static_cast<size_t>(left));
    b = load8(tail);
  }
  const __m256i c = _mm256_cvtepu8_epi32(b);
  lo = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32(15))), zp);
  hi = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4)), zp);
}

inline vf vload_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vf vload_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vf vload_bf16(const uint16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vf vkeep_ge(vf x, float t, vf a) { return _mm256_and_ps(_mm256_cmp_ps(x, vset1(t), _CMP_GE_OQ), a); }

// out lane i = the sum of the W lanes of v[i], for W vectors: pairwise hadds, then the two
// 128-bit halves added.
inline vf vhsum(const vf* v) {
  const __m256 w0 = _mm256_hadd_ps(v[0], v[1]), w1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 w2 = _mm256_hadd_ps(v[4], v[5]), w3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 x0 = _mm256_hadd_ps(w0, w1), x1 = _mm256_hadd_ps(w2, w3);  // per half: v0..v3 | v4..v7
  return _mm256_add_ps(_mm256_permute2f128_ps(x0, x1, 0x20), _mm256_permute2f128_ps(x0, x1, 0x31));
}
