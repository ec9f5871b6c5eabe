// The interface between the torch glue (baseline flags) and the per-ISA kernel objects.
//
// Each ISA object (cpu_isa_avx512.cpp, cpu_isa_avx2.cpp, cpu_isa_portable.cpp) is compiled with
// its own -m flags and without torch headers; it defines exactly the three extern "C" entry
// points declared at the bottom, for its ISA name, and nothing else with external linkage (the
// kernel code sits in an anonymous namespace, so no inline or template copy built for AVX-512
// can be picked by the linker for baseline code). Arguments are raw pointers in the POD
// structs below; the glue owns the tensors, the threads (at::parallel_for) and the scratch
// memory. Only what is in this header crosses the boundary.
#pragma once

#include <stdint.h>

// A float tensor stored as fp32, fp16 or bf16 (read as float by the kernels).
enum QsDtype : int32_t { QS_F32 = 0, QS_F16 = 1, QS_BF16 = 2 };
struct QsFloats {
  const void* p;  // null when the tensor is empty
  int32_t dtype;  // QsDtype
};

// Decode attention over the sink cache (spec: quantsink.kv.attention.decode_attention_ref, Lq == 1).
// Dense regions [B, Hkv, n, D] (sinks n = S0, window n = W); q, qs [B, Hq, 1, D]. Body: codes
// [B, Hkv, T, D * bits / 8] (planar; 3 bits: a 2-bit plane of D / 4 bytes, then a 1-bit plane
// of D / 8 bytes holding bit 2), key scale / zero [B, Hkv, NGk, D], key outliers oi / od
// [B, Hkv, NGk, NOUT, D] (oi: uint8 or int16 slots), value scale / zero [B, Hkv, T, D / vgroup]
// (vsym: zero implied, -scale * (2^bits - 1) / 2 rounded to the scale's dtype).
struct QsDecodeArgs {
  QsFloats q, qs, sink_k, sink_v, win_k, win_v;
  QsFloats ks, kz, od, vs, vz, sink_logits;  // sink_logits: [Hq] or null
  const uint8_t* kc;
  const uint8_t* vc;
  const void* oi;
  int32_t oi_bytes;      // 1: uint8 slots, 2: int16 slots
  int32_t vsym;          // 1: symmetric values (vz unused)
  const uint8_t* mask;   // bool [B, S] (S = S0 + T + W) or null
  float* out;            // float32 [B, Hq, 1, D]
  int64_t B, Hq, Hkv, D, S0, T, W, NGk, NOUT;
  int64_t koff, kgroup, kbits, vbits, vgroup, window;  // window <= 0: none
  float scale, softcap;  // softcap <= 0: none
};

// The scratch floats one decode task (one (b, h), g = Hq / Hkv query rows) needs, carved in
// this order; with base == null only the size is returned. One function for both sides.
struct QsDecodeScratch {
  float *s, *tile, *qf, *qsf, *qg, *sc, *zc, *w, *bias, *zsum, *sink;
};
static inline int64_t qs_decode_scratch(QsDecodeScratch* out, float* base, int64_t g, int64_t S, int64_t D) {
  const int64_t sizes[11] = {g * S, 16 * D, g * D, g * D, g * D, D, D, g * 16, g, g, g};
  float** slots[11] = {&out->s, &out->tile, &out->qf, &out->qsf, &out->qg, &out->sc, &out->zc,
                       &out->w, &out->bias, &out->zsum, &out->sink};
  int64_t at = 0;
  for (int i = 0; i < 11; ++i) {
    if (base) *slots[i] = base + at;
    at += (sizes[i] + 15) / 16 * 16;  // 64-byte steps
  }
  return at;
}

// One 4-bit QuantLinear (spec: quantsink.weights.qmatmul.quant_linear_ref in float32): codes
// two per byte (code 2j in the low nibble of byte j), `stride` bytes per row; fp16 scale and
// uint8 zero point [N, ngroups]; fp16 outlier columns wo [N, k] (k = QsW4Input.k); bias [N] or
// null; y float32 [M, N].
struct QsW4Layer {
  const uint8_t* codes;
  int64_t stride;
  const uint16_t* scale;
  const uint8_t* zero;
  int64_t ngroups;
  const uint16_t* wo;
  const float* bias;
  int64_t N;
  float* y;
};

// x prepared once per call by the glue: xe[m][j] = x_q[m][2j], xh[m][j] = x_q[m][2j + 1]
// (zero past n_q, `half` = ngroups * G / 2 per row), xo[m][j] = x_o[m][j] (zero past k,
// `kpad` = k rounded up to 16 per row).
struct QsW4Input {
  const float* xe;
  const float* xh;
  const float* xo;
  int64_t M, half, kpad, k, G, nq;
};

// y[m][v] = s[v] * sum_h x[m][h] w[v][h] (spec: quantsink.weights.rows_ops.int8_rows_ref in
// float32): x float32 [M, H], w int8 [V, H] (any alignment), s fp16 [V], y float32 [M, V].
struct QsInt8Args {
  const float* x;
  const int8_t* w;
  const uint16_t* s;
  float* y;
  int64_t M, H, V;
};

// The entry points of one ISA object: work items [lo, hi) (decode: (b, h) pairs, scratch of
// qs_decode_scratch floats; w4: output rows of one layer; int8: vocabulary rows).
#define QS_DECLARE_ISA(isa)                                                                       \
  extern "C" void qs_##isa##_sink_decode(const QsDecodeArgs* a, int64_t lo, int64_t hi, float* scratch); \
  extern "C" void qs_##isa##_w4_linear(const QsW4Layer* layer, const QsW4Input* in, int64_t lo, int64_t hi); \
  extern "C" void qs_##isa##_int8_rows(const QsInt8Args* a, int64_t lo, int64_t hi);

QS_DECLARE_ISA(avx512)
QS_DECLARE_ISA(avx2)
QS_DECLARE_ISA(portable)
