// The int8-rows product of the embedding / lm_head: y[m][v] = s[v] * (x[m] . w[v]) (QsInt8Args).
//
// The spec is quantsink.weights.rows_ops.int8_rows_ref in float32, x @ (w * s[:, None]).T:
// int8 times fp16 is exact in float, so only the summation order and the one scaling differ.
// Rows of w are read W bytes at a time with unaligned loads (safetensors mmap views are not
// aligned), never past the row: the last H % W columns take a scalar loop. NR vocabulary rows
// x MB input rows accumulate together, so one pass over w serves up to 8 input rows.

template <int MB, int NR>
void int8_rows_vec(const QsInt8Args& a, int64_t m0, int64_t v0, int64_t v1) {
  const int64_t H = a.H, hv = H / W * W;
  const float* x = a.x + m0 * H;
  for (int64_t v = v0; v + NR <= v1; v += NR) {
    vf acc[NR][MB];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = vzero();
    for (int64_t h = 0; h < hv; h += W)
      for (int r = 0; r < NR; ++r) {
        const vf w = vload_i8(a.w + (v + r) * H + h);
        for (int m = 0; m < MB; ++m) acc[r][m] = vfma(w, vload(x + m * H + h), acc[r][m]);
      }
    for (int r = 0; r < NR; ++r) {
      const int8_t* wr = a.w + (v + r) * H;
      const float s = h2f(a.s[v + r]);
      for (int m = 0; m < MB; ++m) {
        float t = vsum(acc[r][m]);
        for (int64_t h = hv; h < H; ++h) t += static_cast<float>(wr[h]) * x[m * H + h];
        a.y[(m0 + m) * a.V + v + r] = s * t;
      }
    }
  }
}

template <int MB>
void int8_block(const QsInt8Args& a, int64_t m0, int64_t v0, int64_t v1) {
  constexpr int NR = INT8_ACC / MB > 1 ? INT8_ACC / MB : 1;
  const int64_t v_full = v0 + (v1 - v0) / NR * NR;
  int8_rows_vec<MB, NR>(a, m0, v0, v_full);
  if (NR > 1) int8_rows_vec<MB, 1>(a, m0, v_full, v1);
}

inline void int8_rows(const QsInt8Args& a, int64_t v0, int64_t v1) {
  int64_t m = 0;
  for (; m + 8 <= a.M; m += 8) int8_block<8>(a, m, v0, v1);
  switch (a.M - m) {
    case 7: int8_block<7>(a, m, v0, v1); break;
    case 6: int8_block<6>(a, m, v0, v1); break;
    case 5: int8_block<5>(a, m, v0, v1); break;
    case 4: int8_block<4>(a, m, v0, v1); break;
    case 3: int8_block<3>(a, m, v0, v1); break;
    case 2: int8_block<2>(a, m, v0, v1); break;
    case 1: int8_block<1>(a, m, v0, v1); break;
    default: break;
  }
}
