// W4A32 linear straight from a QuantLinear's stored buffers (layout: QsW4Layer in cpu_isa.h).
//
// The spec is quantsink.weights.qmatmul.quant_linear_ref in float32: y = x_q @ ((c - zp) * s).T
// + x_o @ W_o.T + bias. (c - zp) is exact in float; each group's partial dot is scaled once.
// Vector path (G a multiple of 2W): W bytes of a row hold 2W codes, the low nibbles
// multiplying the even channels of x (xe) and the high nibbles the odd ones (xh); NR output
// rows x MB input rows are accumulated together, even and odd codes in chains of their own.
// Other even group sizes take the scalar loop.

template <int MB, int NR>
void w4_rows_vec(const QsW4Layer& L, const QsW4Input& in, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nchunks = (in.nq + 2 * W - 1) / (2 * W), per_group = in.G / (2 * W);
  const float* xe = in.xe + m0 * in.half;
  const float* xh = in.xh + m0 * in.half;
  for (int64_t n = n0; n + NR <= n1; n += NR) {
    vf acc[NR][MB];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = vzero();
    for (int64_t g = 0; g < L.ngroups; ++g) {
      vf t[NR][MB][2];
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) t[r][m][0] = t[r][m][1] = vzero();
      const int64_t c1 = imin(nchunks, (g + 1) * per_group);
      for (int64_t c = g * per_group; c < c1; ++c)
        for (int r = 0; r < NR; ++r) {
          vf lo, hi;
          vnibbles(L.codes + (n + r) * L.stride + W * c, L.stride - W * c,
                   vset1(static_cast<float>(L.zero[(n + r) * L.ngroups + g])), lo, hi);
          for (int m = 0; m < MB; ++m) {
            t[r][m][0] = vfma(lo, vload(xe + m * in.half + W * c), t[r][m][0]);
            t[r][m][1] = vfma(hi, vload(xh + m * in.half + W * c), t[r][m][1]);
          }
        }
      for (int r = 0; r < NR; ++r) {
        const vf s = vset1(h2f(L.scale[(n + r) * L.ngroups + g]));
        for (int m = 0; m < MB; ++m) acc[r][m] = vfma(s, vadd(t[r][m][0], t[r][m][1]), acc[r][m]);
      }
    }
    float tail[NR][MB] = {};
    int64_t j = 0;
    for (; j + W <= in.k; j += W)  // fp16 outlier columns
      for (int r = 0; r < NR; ++r) {
        const vf wo = vload_f16(L.wo + (n + r) * in.k + j);
        for (int m = 0; m < MB; ++m) acc[r][m] = vfma(wo, vload(in.xo + (m0 + m) * in.kpad + j), acc[r][m]);
      }
    for (; j < in.k; ++j)
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) tail[r][m] += h2f(L.wo[(n + r) * in.k + j]) * in.xo[(m0 + m) * in.kpad + j];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MB; ++m)
        L.y[(m0 + m) * L.N + n + r] = vsum(acc[r][m]) + tail[r][m] + (L.bias ? L.bias[n + r] : 0.f);
  }
}

// All of [n0, n1) for MB input rows: blocks of NR output rows, then one at a time.
template <int MB>
void w4_block(const QsW4Layer& L, const QsW4Input& in, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = W4_ACC / MB > 1 ? W4_ACC / MB : 1;
  const int64_t n_full = n0 + (n1 - n0) / NR * NR;
  w4_rows_vec<MB, NR>(L, in, m0, n0, n_full);
  if (NR > 1) w4_rows_vec<MB, 1>(L, in, m0, n_full, n1);
}

// The scalar loop (group sizes that are not a multiple of 2W), one input row at a time.
inline void w4_rows_scalar(const QsW4Layer& L, const QsW4Input& in, int64_t m, int64_t n0, int64_t n1) {
  const float* xe = in.xe + m * in.half;
  const float* xh = in.xh + m * in.half;
  const int64_t G = in.G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = L.codes + n * L.stride;
    float acc = 0.f;
    for (int64_t g = 0; g < L.ngroups; ++g) {
      const float zp = static_cast<float>(L.zero[n * L.ngroups + g]);
      float t = 0.f;
      const int64_t j1 = imin((g + 1) * G, in.nq + (in.nq & 1)) / 2;
      for (int64_t j = g * G / 2; j < j1; ++j)
        t += (static_cast<float>(w[j] & 15) - zp) * xe[j] + (static_cast<float>(w[j] >> 4) - zp) * xh[j];
      acc += h2f(L.scale[n * L.ngroups + g]) * t;
    }
    for (int64_t j = 0; j < in.k; ++j) acc += h2f(L.wo[n * in.k + j]) * in.xo[m * in.kpad + j];
    L.y[m * L.N + n] = acc + (L.bias ? L.bias[n] : 0.f);
  }
}

inline void w4_linear(const QsW4Layer& L, const QsW4Input& in, int64_t n0, int64_t n1) {
  int64_t m = 0;
  if (in.G % (2 * W) == 0) {
    for (; m + 4 <= in.M; m += 4) w4_block<4>(L, in, m, n0, n1);
    if (in.M - m == 3) w4_block<3>(L, in, m, n0, n1);
    if (in.M - m == 2) w4_block<2>(L, in, m, n0, n1);
    if (in.M - m == 1) w4_block<1>(L, in, m, n0, n1);
    return;
  }
  for (; m < in.M; ++m) w4_rows_scalar(L, in, m, n0, n1);
}
