// The three extern "C" entry points of one ISA object, named qs_<isa>_* (QS_ISA, set by the
// including cpu_isa_<isa>.cpp). The kernels they call have internal linkage; these are the
// object's only global symbols (tests/test_kernels_cpu_isa.py checks it with nm).
#define QS_CAT2(a, b) a##b
#define QS_CAT(a, b) QS_CAT2(a, b)
#define QS_ENTRY(name) QS_CAT(QS_CAT(qs_, QS_ISA), QS_CAT(_, name))

extern "C" void QS_ENTRY(sink_decode)(const QsDecodeArgs* a, int64_t lo, int64_t hi, float* scratch) {
  sink_decode(*a, lo, hi, scratch);
}

extern "C" void QS_ENTRY(w4_linear)(const QsW4Layer* layer, const QsW4Input* in, int64_t lo, int64_t hi) {
  w4_linear(*layer, *in, lo, hi);
}

extern "C" void QS_ENTRY(int8_rows)(const QsInt8Args* a, int64_t lo, int64_t hi) { int8_rows(*a, lo, hi); }
