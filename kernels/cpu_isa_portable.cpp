// The portable kernel object: no extra flags: plain C++ for any x86-64 or aarch64 (and any other) target.
//
// Built by kernels/cpu_ext.py with the C++ compiler directly (no torch headers), linked into the
// extension, and only called on a CPU that has these features (cpu_dispatch.cpp checks).
// Everything but the entry points (cpu_isa_entries.h) is in the anonymous namespace.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_isa.h"

namespace {
#include "cpu_vec_portable.h"
// (the vector header above is the only ISA-specific part)
#include "cpu_kern_common.h"
#include "cpu_kern_tiles.h"
#include "cpu_kern_attention.h"
#include "cpu_kern_w4.h"
#include "cpu_kern_int8.h"
}  // namespace

#define QS_ISA portable
#include "cpu_isa_entries.h"
