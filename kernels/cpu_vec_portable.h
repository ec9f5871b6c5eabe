// The vector type of the portable level: 8 floats in a plain struct, every operation a short
// loop that the compiler vectorises for the target it is built for (SSE2 on any x86-64, NEON
// on aarch64). No intrinsics: this file compiles with any C++17 compiler for any CPU.
//
// Included inside the anonymous namespace of cpu_isa_portable.cpp. This header is also the
// reference meaning of the names every vector header defines.

constexpr int W = 8;        // lanes
constexpr int W4_ACC = 4;   // W4A32: output rows x input rows accumulated at once
constexpr int INT8_ACC = 8;  // int8 rows: the same

struct vf {
  float v[W];
};

#define QS_LANES(expr)           \
  vf r;                          \
  for (int i = 0; i < W; ++i) r.v[i] = (expr); \
  return r

inline vf vzero() { QS_LANES(0.f); }
inline vf vset1(float x) { QS_LANES(x); }
inline vf vload(const float* p) { QS_LANES(p[i]); }
inline void vstore(float* p, vf a) {
  for (int i = 0; i < W; ++i) p[i] = a.v[i];
}
inline vf vadd(vf a, vf b) { QS_LANES(a.v[i] + b.v[i]); }
inline vf vsub(vf a, vf b) { QS_LANES(a.v[i] - b.v[i]); }
inline vf vmul(vf a, vf b) { QS_LANES(a.v[i] * b.v[i]); }
inline vf vmax(vf a, vf b) { QS_LANES(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline vf vfma(vf a, vf b, vf c) { QS_LANES(a.v[i] * b.v[i] + c.v[i]); }  // a * b + c

inline float vsum(vf a) {  // pairwise, like the vector levels
  for (int h = W / 2; h > 0; h /= 2)
    for (int i = 0; i < h; ++i) a.v[i] += a.v[i + h];
  return a.v[0];
}
inline float vmaxall(vf a) {
  for (int h = W / 2; h > 0; h /= 2)
    for (int i = 0; i < h; ++i) a.v[i] = a.v[i] > a.v[i + h] ? a.v[i] : a.v[i + h];
  return a.v[0];
}

// ((p[j] >> shift) & mask) as float, j < W.
inline vf vbits(const uint8_t* p, int shift, int mask) { QS_LANES(static_cast<float>((p[i] >> shift) & mask)); }

// W bytes of two 4-bit codes: lo = low nibbles - zp, hi = high nibbles - zp (exact). Only the
// first `left` bytes are read: a row's last bytes are copied to a zeroed local buffer.
inline void vnibbles(const uint8_t* p, int64_t left, vf zp, vf& lo, vf& hi) {
  uint8_t b[W] = {0};
  if (left >= W) memcpy(b, p, W);  // a constant size: one 8-byte load
  else memcpy(b, p, static_cast<size_t>(left));
  for (int i = 0; i < W; ++i) {
    lo.v[i] = static_cast<float>(b[i] & 15) - zp.v[i];
    hi.v[i] = static_cast<float>(b[i] >> 4) - zp.v[i];
  }
}

inline vf vload_i8(const int8_t* p) { QS_LANES(static_cast<float>(p[i])); }
inline float h2f(uint16_t h);  // cpu_kern_common.h
inline vf vload_f16(const uint16_t* p) { QS_LANES(h2f(p[i])); }
inline vf vload_bf16(const uint16_t* p) {
  vf r;
  for (int i = 0; i < W; ++i) {
    const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
    memcpy(&r.v[i], &u, sizeof(float));
  }
  return r;
}

// Round to nearest even (|x| < 2^22: adding and removing 1.5 * 2^23 leaves the integer part).
inline vf vround(vf x) { QS_LANES((x.v[i] + 12582912.f) - 12582912.f); }
inline vf vpow2i(vf n) {  // 2^n for integral n in [-126, 127]
  vf r;
  for (int i = 0; i < W; ++i) {
    const int32_t e = (static_cast<int32_t>(n.v[i]) + 127) << 23;
    memcpy(&r.v[i], &e, sizeof(float));
  }
  return r;
}
inline vf vkeep_ge(vf x, float t, vf a) { QS_LANES(x.v[i] >= t ? a.v[i] : 0.f); }

// out lane i = the sum of the W lanes of v[i], for W vectors.
inline vf vhsum(const vf* v) { QS_LANES(vsum(v[i])); }

#undef QS_LANES
