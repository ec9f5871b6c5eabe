// Scalar helpers and vector building blocks shared by the kernels of every ISA level.
//
// Included inside the anonymous namespace of each cpu_isa_*.cpp, after its vector header
// (W, vf, v* functions). No std templates (std::min, std::vector, ...): their out-of-line
// copies would be weak symbols built for this ISA; everything here has internal linkage.

constexpr int64_t TILE = 16;  // tokens per tile of the attention kernel (a multiple of W)
constexpr float NEG_INF = -__builtin_inff();

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline float fmaxf2(float a, float b) { return a > b ? a : b; }

inline float bits_to_f(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t f_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

// fp16 -> float, exact: the exponent and mantissa shifted into place and rescaled by 2^112
// (normal and subnormal halves alike); inf / nan keep an all-ones exponent.
inline float h2f(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, em = h & 0x7fffu;
  if (em >= 0x7c00u) return bits_to_f(sign | 0x7f800000u | (em & 0x3ffu) << 13);
  return bits_to_f(sign | f_to_bits(bits_to_f(em << 13) * 0x1p112f));
}

// float -> the nearest fp16 (ties to even), as float: the implied zero of symmetric values is
// stored-dtype (PackedBlock.zero_or_implied rounds it to the scale's dtype).
inline float round_f16(float f) {
  uint32_t x = f_to_bits(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint32_t o;
  if (x >= 0x47800000u) {  // >= 2^16: inf (nan stays nan)
    o = x > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (x < 0x38800000u) {  // below 2^-14: subnormal, rounded by a float addition
    o = f_to_bits(bits_to_f(x) + 0.5f) - 0x3f000000u;
  } else {
    o = (x + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((x >> 13) & 1u)) >> 13;
  }
  return h2f(static_cast<uint16_t>(o | sign >> 16));
}

inline float round_bf16(float f) {
  const uint32_t x = f_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return f;  // nan
  return bits_to_f((x + 0x7fffu + ((x >> 16) & 1u)) & 0xffff0000u);
}

inline float round_to(float v, int32_t dtype) {
  return dtype == QS_F16 ? round_f16(v) : dtype == QS_BF16 ? round_bf16(v) : v;
}

inline float float_at(const QsFloats& f, int64_t i) {
  if (f.dtype == QS_F32) return static_cast<const float*>(f.p)[i];
  const uint16_t h = static_cast<const uint16_t*>(f.p)[i];
  return f.dtype == QS_F16 ? h2f(h) : bits_to_f(static_cast<uint32_t>(h) << 16);
}

// dst[0:n] = float(f[off:off + n]).
inline void load_floats(const QsFloats& f, int64_t off, int64_t n, float* __restrict dst) {
  if (f.dtype == QS_F32) {
    memcpy(dst, static_cast<const float*>(f.p) + off, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(f.p) + off;
  int64_t i = 0;
  if (f.dtype == QS_F16)
    for (; i + W <= n; i += W) vstore(dst + i, vload_f16(src + i));
  else
    for (; i + W <= n; i += W) vstore(dst + i, vload_bf16(src + i));
  for (; i < n; ++i) dst[i] = float_at(f, off + i);
}

// sum_i a[i] b[i]: W lanes, then the scalar tail.
inline float vdot(const float* a, const float* b, int64_t n) {
  vf acc = vzero();
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = vsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Constants of exp(x) for x <= 0 (softmax after subtracting the row maximum): Cody-Waite range
// reduction and a degree-6 polynomial (relative error < 2e-7), 0 below -87 (and for -inf).
constexpr float EXP_C[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline vf vexp_nonpos(vf x) {
  const vf xc = vmax(x, vset1(-87.f));
  const vf n = vround(vmul(xc, vset1(1.44269504088896341f)));
  const vf r = vfma(n, vset1(2.12194440e-4f), vsub(xc, vmul(n, vset1(0.693359375f))));
  vf p = vset1(EXP_C[0]);
  for (int i = 1; i < 6; ++i) p = vfma(p, r, vset1(EXP_C[i]));
  p = vadd(vfma(vmul(p, r), r, r), vset1(1.f));
  return vkeep_ge(x, -87.f, vmul(p, vpow2i(n)));
}

inline float exp_nonpos(float x) {  // one lane of vexp_nonpos (the row tails)
  float lanes[W];
  vstore(lanes, vexp_nonpos(vset1(x)));
  return lanes[0];
}
