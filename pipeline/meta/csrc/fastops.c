/* fewscan's CPU kernels for the Conv-4 fast paths (pipeline/meta/fastops.py).

   Plain C with no torch headers, so it compiles in about a second with the system compiler when first
   needed (pipeline/meta/native.py) and is called through ctypes, which releases the GIL: the engine's
   task threads run these kernels in parallel. Each kernel is exact: it computes the same values as the
   torch ops it replaces (the GroupNorm double backward up to rounding; it accumulates in double). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FEWSCAN_POOL_SIMD 1
#include "pool_avx512.h"
#endif

#define REAL float
#define FN(name) name##_f32
#include "fastops_impl.h"
#undef REAL
#undef FN

#define REAL double
#define FN(name) name##_f64
#include "fastops_impl.h"
#undef REAL
#undef FN

int fewscan_fastops_abi(void) { return 1; }

/* 1 when the float32 pool kernels are the AVX-512 ones. The portable versions are exact too, but slower
   than ATen's channels-last pool on short rows (branchy remainders), so the Python side uses them only
   for float64 tests and when asked (pipeline/meta/native.py). */
int fewscan_pool_simd(void) {
#ifdef FEWSCAN_POOL_SIMD
    return 1;
#else
    return 0;
#endif
}
