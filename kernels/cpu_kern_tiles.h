// Tile pieces of the decode-attention kernel (cpu_kern_attention.h): code unpacking, the dot
// products of a tile of TILE rows, value accumulation and the softmax, written once on vf.
//
// Planar codes (quantsink.kv.primitives): a row of D codes of `bits` bits, P = D * bits / 8
// bytes for bits in {2, 4, 8}; byte j holds code j + i * P at bits [i * bits, (i + 1) * bits)
// for i < 8 / bits. 3 bits: the first D / 4 bytes are the 2-bit layout of the low 2 bits,
// the next D / 8 bytes a 1-bit layout of bit 2 (byte j holds bit 2 of code j + i * D / 8 at
// bit i, i < 8).

// dst[i * P + j] = (src[j] >> (i * BITS)) & MASK for j < P, i < 8 / BITS.
template <int BITS>
inline void unpack_planes(const uint8_t* __restrict src, float* __restrict dst, int64_t P) {
  constexpr int PER = 8 / BITS, MASK = (1 << BITS) - 1;
  int64_t j0 = 0;
  for (; j0 + W <= P; j0 += W)
    for (int i = 0; i < PER; ++i) vstore(dst + i * P + j0, vbits(src + j0, i * BITS, MASK));
  for (int i = 0; i < PER; ++i)
    for (int64_t j = j0; j < P; ++j) dst[i * P + j] = static_cast<float>((src[j] >> (i * BITS)) & MASK);
}

// dst[i * P + j] += 4 * bit i of src[j] (the third bit of 3-bit codes), P = D / 8.
inline void add_bit2(const uint8_t* __restrict src, float* __restrict dst, int64_t P) {
  const vf four = vset1(4.f);
  int64_t j0 = 0;
  for (; j0 + W <= P; j0 += W)
    for (int i = 0; i < 8; ++i) vstore(dst + i * P + j0, vfma(vbits(src + j0, i, 1), four, vload(dst + i * P + j0)));
  for (int i = 0; i < 8; ++i)
    for (int64_t j = j0; j < P; ++j) dst[i * P + j] += static_cast<float>(4 * ((src[j] >> i) & 1));
}

inline void unpack_row(const uint8_t* src, float* dst, int64_t D, int64_t bits) {
  if (bits == 4) unpack_planes<4>(src, dst, D / 2);
  else if (bits == 2) unpack_planes<2>(src, dst, D / 4);
  else if (bits == 8) unpack_planes<8>(src, dst, D);
  else {  // 3
    unpack_planes<2>(src, dst, D / 4);
    add_bit2(src + D / 4, dst, D / 8);
  }
}

// s[r * S + j] = q_r . rows[j] + bias[r] for j < n, r < g (rows: [n, D] float; bias may be
// null). Full blocks of W rows: W dot products reduced together (vhsum); D % W == 0.
template <int DC>
void tile_dots(const float* q, int64_t g, const float* rows, int64_t n, int64_t Dr, float* s, int64_t S,
               const float* bias) {
  const int64_t D = DC ? DC : Dr;
  const int64_t nv = D % W == 0 ? n / W * W : 0;
  for (int64_t r = 0; r < g; ++r) {
    const float* qr = q + r * D;
    const float b = bias ? bias[r] : 0.f;
    for (int64_t j0 = 0; j0 < nv; j0 += W) {
      vf v[W];
      for (int j = 0; j < W; ++j) {
        const float* row = rows + (j0 + j) * D;
        vf a = vzero();
        for (int64_t c = 0; c < D; c += W) a = vfma(vload(qr + c), vload(row + c), a);
        v[j] = a;
      }
      vstore(s + r * S + j0, vadd(vhsum(v), vset1(b)));
    }
    for (int64_t j = nv; j < n; ++j) s[r * S + j] = vdot(qr, rows + j * D, D) + b;
  }
}

// acc[r * D + d] += sum_{j < n} w[r * ws + j] rows[j * D + d]. Head dims 64 / 128: the
// accumulators stay in registers, at most 8 vectors per pass over the rows.
template <int DC>
void tile_accumulate(const float* w, int64_t g, int64_t ws, const float* rows, int64_t n, int64_t Dr, float* acc) {
  const int64_t D = DC ? DC : Dr;
  if (DC > 0 && DC % W == 0) {
    constexpr int NV = DC / W > 8 ? 8 : (DC / W > 0 ? DC / W : 1);
    for (int64_t r = 0; r < g; ++r)
      for (int64_t d0 = 0; d0 < D; d0 += NV * W) {
        vf a[NV];
        for (int c = 0; c < NV; ++c) a[c] = vload(acc + r * D + d0 + W * c);
        for (int64_t j = 0; j < n; ++j) {
          const vf x = vset1(w[r * ws + j]);
          for (int c = 0; c < NV; ++c) a[c] = vfma(x, vload(rows + j * D + d0 + W * c), a[c]);
        }
        for (int c = 0; c < NV; ++c) vstore(acc + r * D + d0 + W * c, a[c]);
      }
    return;
  }
  for (int64_t r = 0; r < g; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const float x = w[r * ws + j];
      float* __restrict a = acc + r * D;
      const float* __restrict v = rows + j * D;
      int64_t d = 0;
      for (; d + W <= D; d += W) vstore(a + d, vfma(vset1(x), vload(v + d), vload(a + d)));
      for (; d < D; ++d) a[d] += x * v[d];
    }
}

// x[0:n] = x * a + b.
inline void scale_shift(float* x, int64_t n, float a, float b) {
  int64_t d = 0;
  for (; d + W <= n; d += W) vstore(x + d, vfma(vload(x + d), vset1(a), vset1(b)));
  for (; d < n; ++d) x[d] = x[d] * a + b;
}

// Softmax of each row of s [g, S] in place (masked entries are -inf), with an optional learned
// sink logit per row in the denominator; a fully masked row gives zeros.
inline void softmax_rows(float* s, int64_t g, int64_t S, const float* sink) {
  for (int64_t r = 0; r < g; ++r) {
    float* x = s + r * S;
    vf vm = vset1(sink ? sink[r] : NEG_INF);
    int64_t j = 0;
    for (; j + W <= S; j += W) vm = vmax(vm, vload(x + j));
    float m = vmaxall(vm);
    for (; j < S; ++j) m = fmaxf2(m, x[j]);
    if (m == NEG_INF) {
      for (j = 0; j < S; ++j) x[j] = 0.f;
      continue;
    }
    vf vs = vzero();
    const vf mv = vset1(m);
    for (j = 0; j + W <= S; j += W) {
      const vf e = vexp_nonpos(vsub(vload(x + j), mv));
      vstore(x + j, e);
      vs = vadd(vs, e);
    }
    float sum = vsum(vs) + (sink ? expf(sink[r] - m) : 0.f);
    for (; j < S; ++j) {
      x[j] = exp_nonpos(x[j] - m);
      sum += x[j];
    }
    const vf inv = vset1(1.f / sum);
    for (j = 0; j + W <= S; j += W) vstore(x + j, vmul(vload(x + j), inv));
    for (; j < S; ++j) x[j] *= 1.f / sum;
  }
}
