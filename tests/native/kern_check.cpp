// Native check of one ISA level's kernel object (no torch): W4A32 linear, decode attention and
// int8 rows against naive double-precision loops on random inputs.
//
// Build with the level's object source, e.g. (tests/test_native_aarch64.py does this):
//   g++ -O2 -std=c++17 -Ikernels [-m flags] -DQS_LEVEL=portable kernels/cpu_isa_portable.cpp \
//       tests/native/kern_check.cpp -o kern_check
// Prints one line per check ("ok <name> <max error / bound>") and exits 1 on any failure.
// `kern_check perturb` shifts every reference a little (a zero point by one code, a scale by
// 1 %, a key by 0.05): then every check must fail (the bounds can fail).
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <vector>

#include "cpu_isa.h"

#define QS_CAT2(a, b) a##b
#define QS_CAT(a, b) QS_CAT2(a, b)
#define QS_CALL(name) QS_CAT(QS_CAT(qs_, QS_LEVEL), QS_CAT(_, name))
#define QS_STR2(x) #x
#define QS_STR(x) QS_STR2(x)

namespace {

uint64_t rng_state = 0x9e3779b97f4a7c15ull;
uint32_t next_u32() {  // xorshift64*
  rng_state ^= rng_state >> 12, rng_state ^= rng_state << 25, rng_state ^= rng_state >> 27;
  return static_cast<uint32_t>((rng_state * 0x2545f4914f6cdd1dull) >> 32);
}
float uniform() { return static_cast<float>(next_u32() >> 8) / 16777216.f; }  // [0, 1)
float symmetric() { return 2.f * uniform() - 1.f; }
int randint(int n) { return static_cast<int>(next_u32() % static_cast<uint32_t>(n)); }

// A positive fp16 in [2^-7, 2^-2) and its exact value.
uint16_t rand_half() { return static_cast<uint16_t>(((8 + randint(5)) << 10) | randint(1024)); }
double half_value(uint16_t h) { return ldexp(1.0 + (h & 1023) / 1024.0, ((h >> 10) & 31) - 15); }

int failures = 0;
bool perturb = false;
void report(const char* name, double worst) {  // worst: max |err| / bound (<= 1 passes)
  const bool ok = worst <= 1.0;
  printf("%s %s %.3g\n", ok ? "ok" : "FAIL", name, worst);
  failures += !ok;
}

// W4A32: N outputs, n_q quantized inputs in groups of G, k fp16 outlier columns, M rows.
void check_w4(int64_t M, int64_t N, int64_t nq, int64_t G, int64_t k) {
  const int64_t ng = (nq + G - 1) / G, stride = ng * G / 2, half = ng * G / 2, kpad = (k + 15) / 16 * 16;
  std::vector<uint8_t> codes(N * stride);
  std::vector<uint16_t> scale(N * ng), wo(N * k);
  std::vector<uint8_t> zero(N * ng);
  std::vector<float> bias(N), x(M * (nq + k)), xe(M * half, 0.f), xh(M * half, 0.f), xo(M * kpad, 0.f);
  for (auto& c : codes) c = static_cast<uint8_t>(randint(256));
  for (auto& s : scale) s = rand_half();
  for (auto& z : zero) z = static_cast<uint8_t>(randint(16));
  for (auto& w : wo) w = rand_half();
  for (auto& b : bias) b = symmetric();
  for (auto& v : x) v = 3.f * symmetric();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < nq; ++j) ((j & 1) ? xh : xe)[m * half + j / 2] = x[m * (nq + k) + j];
    for (int64_t j = 0; j < k; ++j) xo[m * kpad + j] = x[m * (nq + k) + nq + j];
  }
  std::vector<float> y(M * N);
  const QsW4Layer L{codes.data(), stride, scale.data(), zero.data(), ng, wo.data(), bias.data(), N, y.data()};
  const QsW4Input in{xe.data(), xh.data(), xo.data(), M, half, kpad, k, G, nq};
  QS_CALL(w4_linear)(&L, &in, 0, N);
  double worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double ref = bias[n], mag = fabs(bias[n]);
      for (int64_t j = 0; j < nq; ++j) {
        const int code = (codes[n * stride + j / 2] >> (4 * (j & 1))) & 15;
        const double w = (code - zero[n * ng + j / G] - perturb) * half_value(scale[n * ng + j / G]);
        ref += w * x[m * (nq + k) + j], mag += fabs(w * x[m * (nq + k) + j]);
      }
      for (int64_t j = 0; j < k; ++j) {
        const double t = half_value(wo[n * k + j]) * x[m * (nq + k) + nq + j];
        ref += t, mag += fabs(t);
      }
      worst = fmax(worst, fabs(y[m * N + n] - ref) / (ldexp(mag, -20) + 1e-6));
    }
  char name[96];
  snprintf(name, sizeof(name), "w4_linear M=%lld N=%lld nq=%lld G=%lld k=%lld", (long long)M, (long long)N,
           (long long)nq, (long long)G, (long long)k);
  report(name, worst);
}

void check_int8(int64_t M, int64_t V, int64_t H) {
  std::vector<float> x(M * H), y(M * V);
  std::vector<int8_t> w(V * H + 3);
  std::vector<uint16_t> s(V);
  for (auto& v : x) v = symmetric();
  for (auto& v : w) v = static_cast<int8_t>(randint(255) - 127);
  for (auto& v : s) v = rand_half();
  const int8_t* wr = w.data() + 3;  // rows at an odd address
  const QsInt8Args a{x.data(), wr, s.data(), y.data(), M, H, V};
  QS_CALL(int8_rows)(&a, 0, V);
  double worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t v = 0; v < V; ++v) {
      double ref = 0, mag = 0;
      for (int64_t h = 0; h < H; ++h) ref += wr[v * H + h] * x[m * H + h], mag += fabs(wr[v * H + h] * x[m * H + h]);
      const double sv = half_value(s[v]) * (perturb ? 1.01 : 1.0);
      worst = fmax(worst, fabs(y[m * V + v] - sv * ref) / (ldexp(sv * mag, -20) + 1e-7));
    }
  char name[64];
  snprintf(name, sizeof(name), "int8_rows M=%lld V=%lld H=%lld", (long long)M, (long long)V, (long long)H);
  report(name, worst);
}

// Decode attention, B = 1, fp32 regions, asymmetric per-token values (one group of D channels
// or D / 2), per-channel keys in groups of kg tokens, planar codes of `bits` (2, 4 or 8).
void check_decode(int64_t Hkv, int64_t g, int64_t D, int64_t S0, int64_t T, int64_t Wn, int64_t kg, int bits,
                  int64_t vg) {
  const int64_t Hq = Hkv * g, S = S0 + T + Wn, NGk = T / kg, P = D * bits / 8;
  const int64_t ngv = D / vg;
  std::vector<float> q(Hq * D), sk(Hkv * S0 * D), sv(Hkv * S0 * D), wk(Hkv * Wn * D), wv(Hkv * Wn * D);
  std::vector<float> ks(Hkv * NGk * D), kz(Hkv * NGk * D), vs(Hkv * T * ngv), vz(Hkv * T * ngv);
  std::vector<uint8_t> kcode(Hkv * T * D), vcode(Hkv * T * D), kc(Hkv * T * P, 0), vc(Hkv * T * P, 0);
  for (auto* v : {&q, &sk, &sv, &wk, &wv, &kz, &vz}) for (auto& e : *v) e = symmetric();
  for (auto* v : {&ks, &vs}) for (auto& e : *v) e = 0.05f + 0.2f * uniform();
  for (auto* c : {&kcode, &vcode}) for (auto& e : *c) e = static_cast<uint8_t>(randint(1 << bits));
  for (int64_t r = 0; r < Hkv * T; ++r)  // planar: byte j holds code j + i * P at bits i * bits
    for (int64_t d = 0; d < D; ++d) {
      kc[r * P + d % P] |= static_cast<uint8_t>(kcode[r * D + d] << (bits * (d / P)));
      vc[r * P + d % P] |= static_cast<uint8_t>(vcode[r * D + d] << (bits * (d / P)));
    }
  std::vector<float> out(Hq * D);
  QsDecodeArgs a{};
  auto f32 = [](const std::vector<float>& v) { return QsFloats{v.empty() ? nullptr : v.data(), QS_F32}; };
  a.q = a.qs = f32(q), a.sink_k = f32(sk), a.sink_v = f32(sv), a.win_k = f32(wk), a.win_v = f32(wv);
  a.ks = f32(ks), a.kz = f32(kz), a.vs = f32(vs), a.vz = f32(vz), a.od = QsFloats{nullptr, QS_F32};
  a.sink_logits = QsFloats{nullptr, QS_F32}, a.kc = kc.data(), a.vc = vc.data(), a.oi = nullptr, a.oi_bytes = 1;
  a.out = out.data(), a.B = 1, a.Hq = Hq, a.Hkv = Hkv, a.D = D, a.S0 = S0, a.T = T, a.W = Wn, a.NGk = NGk;
  a.kgroup = kg, a.kbits = bits, a.vbits = bits, a.vgroup = vg, a.scale = 1.f / sqrtf(static_cast<float>(D));
  QsDecodeScratch none;
  std::vector<float> scratch(qs_decode_scratch(&none, nullptr, g, S, D));
  QS_CALL(sink_decode)(&a, 0, Hkv, scratch.data());
  double worst = 0;
  std::vector<double> K(S * D), Vv(S * D), p(S);
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t t = 0; t < S; ++t)
      for (int64_t d = 0; d < D; ++d) {
        double kk, vv;
        if (t < S0) {
          kk = sk[(h * S0 + t) * D + d], vv = sv[(h * S0 + t) * D + d];
        } else if (t < S0 + T) {
          const int64_t b = t - S0, r = h * T + b, gk = (h * NGk + b / kg) * D + d, gv = r * ngv + d / vg;
          kk = kcode[r * D + d] * static_cast<double>(ks[gk]) + kz[gk] + (perturb ? 0.05 : 0.0);
          vv = vcode[r * D + d] * static_cast<double>(vs[gv]) + vz[gv];
        } else {
          kk = wk[(h * Wn + t - S0 - T) * D + d], vv = wv[(h * Wn + t - S0 - T) * D + d];
        }
        K[t * D + d] = kk, Vv[t * D + d] = vv;
      }
    for (int64_t r = 0; r < g; ++r) {
      const float* qr = q.data() + (h * g + r) * D;
      double mx = -1e300, sum = 0;
      for (int64_t t = 0; t < S; ++t) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += qr[d] * K[t * D + d];
        p[t] = s * a.scale, mx = fmax(mx, p[t]);
      }
      for (int64_t t = 0; t < S; ++t) p[t] = exp(p[t] - mx), sum += p[t];
      for (int64_t d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t t = 0; t < S; ++t) o += p[t] * Vv[t * D + d];
        worst = fmax(worst, fabs(out[(h * g + r) * D + d] - o / sum) / 1e-4);
      }
    }
  }
  char name[96];
  snprintf(name, sizeof(name), "sink_decode bits=%d D=%lld g=%lld S0=%lld T=%lld W=%lld vgroup=%lld", bits,
           (long long)D, (long long)g, (long long)S0, (long long)T, (long long)Wn, (long long)vg);
  report(name, worst);
}

}  // namespace

int main(int argc, char** argv) {
  perturb = argc > 1 && strcmp(argv[1], "perturb") == 0;
  printf("level %s\n", QS_STR(QS_LEVEL));
  for (int64_t G : {32, 64, 128, 16, 48}) check_w4(3, 37, 5 * G - 6, G, 3);
  check_w4(1, 64, 256, 64, 0);
  check_w4(5, 9, 100, 32, 17);
  check_int8(1, 300, 64);
  check_int8(9, 77, 45);
  check_decode(2, 3, 64, 3, 64, 37, 32, 4, 64);
  check_decode(1, 4, 128, 4, 128, 9, 64, 2, 64);
  check_decode(2, 1, 40, 0, 32, 5, 16, 8, 8);
  return failures ? 1 : 0;
}
