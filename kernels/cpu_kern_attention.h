// Decode attention over the sink-aware cache: fp sinks + packed int2/3/4/8 body + fp window.
//
// The spec is quantsink.kv.attention.decode_attention_ref (one query per row). One task is one
// (sequence, KV head) with its g query heads, so every packed key / value byte is read once.
// Rows are handled in tiles of TILE tokens converted to float: keys as codes (per channel, in
// groups of `kgroup` token slots, the first `koff` slots of the first group being phantoms;
// the group's scale folds into the query, q . k = sum_d (q_d s_d) code_d + sum_d q_d z_d),
// values per token (one group per row: the scale folds into the probability and the zero is
// summed once; else rows are dequantized). All arithmetic is fp32. Layouts: cpu_isa.h.

// Scores of the g rows over the packed body keys of one (b, h): s[r * S + t].
template <int DC>
void body_scores(const QsDecodeArgs& a, int64_t bh, const float* q, int64_t g, int64_t Dr, float* s, int64_t S,
                 const QsDecodeScratch& sc) {
  const int64_t D = DC ? DC : Dr, T = a.T;
  const int64_t kw = D * a.kbits / 8;
  for (int64_t n = 0; n < a.NGk; ++n) {
    load_floats(a.ks, (bh * a.NGk + n) * D, D, sc.sc);
    load_floats(a.kz, (bh * a.NGk + n) * D, D, sc.zc);
    for (int64_t r = 0; r < g; ++r) {
      for (int64_t d = 0; d < D; ++d) sc.qg[r * D + d] = q[r * D + d] * sc.sc[d];
      sc.bias[r] = vdot(q + r * D, sc.zc, D);
    }
    const int64_t t0 = imax(0, n * a.kgroup - a.koff), t1 = imin(T, (n + 1) * a.kgroup - a.koff);
    for (int64_t t = t0; t < t1; t += TILE) {
      const int64_t nt = imin(TILE, t1 - t);
      for (int64_t j = 0; j < nt; ++j) unpack_row(a.kc + (bh * T + t + j) * kw, sc.tile + j * D, D, a.kbits);
      tile_dots<DC>(sc.qg, g, sc.tile, nt, D, s + t, S, sc.bias);
    }
    for (int64_t j = 0; j < a.NOUT; ++j) {  // fp16 outliers: add q_d * delta at their slots
      const int64_t base = ((bh * a.NGk + n) * a.NOUT + j) * D;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t slot = a.oi_bytes == 2 ? static_cast<const int16_t*>(a.oi)[base + d]
                                             : static_cast<const uint8_t*>(a.oi)[base + d];
        const int64_t t = n * a.kgroup + slot - a.koff;
        if (t < t0 || t >= t1) continue;
        const float delta = float_at(a.od, base + d);
        for (int64_t r = 0; r < g; ++r) s[r * S + t] += q[r * D + d] * delta;
      }
    }
  }
}

// acc[r * D + d] += sum_t p[r * S + t] v[t, d] over the packed body values of one (b, h).
template <int DC>
void body_values(const QsDecodeArgs& a, int64_t bh, const float* p, int64_t g, int64_t Dr, int64_t S, float* acc,
                 const QsDecodeScratch& sc) {
  const int64_t D = DC ? DC : Dr, T = a.T;
  const int64_t vw = D * a.vbits / 8, ngv = D / a.vgroup;
  const float half_range = -static_cast<float>((1 << a.vbits) - 1) / 2.f;
  for (int64_t r = 0; r < g; ++r) sc.zsum[r] = 0.f;
  for (int64_t t = 0; t < T; t += TILE) {
    const int64_t nt = imin(TILE, T - t);
    for (int64_t j = 0; j < nt; ++j) {
      float* row = sc.tile + j * D;
      unpack_row(a.vc + (bh * T + t + j) * vw, row, D, a.vbits);
      const int64_t at = (bh * T + t + j) * ngv;
      for (int64_t c = 0; c < ngv; ++c) {
        const float s1 = float_at(a.vs, at + c);
        const float z = a.vsym ? round_to(s1 * half_range, a.vs.dtype) : float_at(a.vz, at + c);
        if (ngv > 1) {
          scale_shift(row + c * a.vgroup, a.vgroup, s1, z);
          continue;
        }
        for (int64_t r = 0; r < g; ++r) {
          const float pr = p[r * S + t + j];
          sc.w[r * TILE + j] = pr * s1;
          sc.zsum[r] += pr * z;
        }
      }
    }
    if (ngv == 1) tile_accumulate<DC>(sc.w, g, TILE, sc.tile, nt, D, acc);
    else tile_accumulate<DC>(p + t, g, S, sc.tile, nt, D, acc);
  }
  for (int64_t r = 0; r < g; ++r)
    for (int64_t d = 0; d < D; ++d) acc[r * D + d] += sc.zsum[r];
}

// Scores / value sums over a dense region [n, D] of one (b, h), in tiles of TILE rows.
template <int DC>
void dense_scores(const QsFloats& k, int64_t off, int64_t n, const float* q, int64_t g, int64_t D, float* s,
                  int64_t S, float* tile) {
  for (int64_t j = 0; j < n; j += TILE) {
    const int64_t nt = imin(TILE, n - j);
    load_floats(k, (off + j) * D, nt * D, tile);
    tile_dots<DC>(q, g, tile, nt, D, s + j, S, nullptr);
  }
}

template <int DC>
void dense_values(const QsFloats& v, int64_t off, int64_t n, const float* p, int64_t g, int64_t D, int64_t S,
                  float* acc, float* tile) {
  for (int64_t j = 0; j < n; j += TILE) {
    const int64_t nt = imin(TILE, n - j);
    load_floats(v, (off + j) * D, nt * D, tile);
    tile_accumulate<DC>(p + j, g, S, tile, nt, D, acc);
  }
}

// Softcap, sliding window and key mask on the scores [g, S] of one (b, h).
inline void restrict_scores(const QsDecodeArgs& a, float* s, int64_t g, int64_t S, const uint8_t* mask) {
  for (int64_t r = 0; r < g; ++r) {
    float* x = s + r * S;
    if (a.softcap > 0.f)
      for (int64_t j = 0; j < S; ++j) x[j] = a.softcap * tanhf(x[j] / a.softcap);
    if (a.window > 0)  // body / window keys j <= S - 1 - window are out of the query's window
      for (int64_t j = a.S0; j <= S - 1 - a.window; ++j) x[j] = NEG_INF;
    if (mask)
      for (int64_t j = 0; j < S; ++j)
        if (!mask[j]) x[j] = NEG_INF;
  }
}

// Attention of the g query rows of one (b, h) = bh: writes out [g, D].
template <int DC>
void attend_head(const QsDecodeArgs& a, int64_t bh, int64_t Dr, float* scratch) {
  const int64_t D = DC ? DC : Dr, g = a.Hq / a.Hkv, S0 = a.S0, T = a.T, S = S0 + T + a.W;
  const int64_t b = bh / a.Hkv, h = bh % a.Hkv, q0 = (b * a.Hq + h * g) * D;
  QsDecodeScratch sc;
  qs_decode_scratch(&sc, scratch, g, S, D);
  load_floats(a.q, q0, g * D, sc.qf);
  load_floats(a.qs, q0, g * D, sc.qsf);
  for (int64_t i = 0; i < g * D; ++i) sc.qf[i] *= a.scale, sc.qsf[i] *= a.scale;
  if (a.sink_logits.p) load_floats(a.sink_logits, h * g, g, sc.sink);
  float* out = a.out + q0;
  for (int64_t i = 0; i < g * D; ++i) out[i] = 0.f;
  dense_scores<DC>(a.sink_k, bh * S0, S0, sc.qsf, g, D, sc.s, S, sc.tile);
  if (T) body_scores<DC>(a, bh, sc.qf, g, D, sc.s + S0, S, sc);
  dense_scores<DC>(a.win_k, bh * a.W, a.W, sc.qf, g, D, sc.s + S0 + T, S, sc.tile);
  const uint8_t* mask = a.mask ? a.mask + b * S : nullptr;
  if (a.softcap > 0.f || a.window > 0 || mask) restrict_scores(a, sc.s, g, S, mask);
  softmax_rows(sc.s, g, S, a.sink_logits.p ? sc.sink : nullptr);
  dense_values<DC>(a.sink_v, bh * S0, S0, sc.s, g, D, S, out, sc.tile);
  if (T) body_values<DC>(a, bh, sc.s + S0, g, D, S, out, sc);
  dense_values<DC>(a.win_v, bh * a.W, a.W, sc.s + S0 + T, g, D, S, out, sc.tile);
}

inline void sink_decode(const QsDecodeArgs& a, int64_t bh0, int64_t bh1, float* scratch) {
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    if (a.D == 64) attend_head<64>(a, bh, a.D, scratch);
    else if (a.D == 128) attend_head<128>(a, bh, a.D, scratch);
    else attend_head<0>(a, bh, a.D, scratch);
  }
}
