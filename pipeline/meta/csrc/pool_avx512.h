/* AVX-512 versions of the float32 pool kernels, one output row at a time, 16 outputs per step with
   masked loads and stores (Conv-4 rows are 14, 7, 3 or 1 outputs wide: a compiler-vectorised loop would
   run its scalar remainder, whose data-dependent branches mispredict on every other element). The
   selection logic is the scalar kernel's, lane by lane: exact, including ATen's tie and NaN rule. */
#include <immintrin.h>

static inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

static inline void deinterleave(const float *r, int64_t cnt, __m512 *even, __m512 *odd) {
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512 lo = _mm512_maskz_loadu_ps(lanes(2 * cnt), r);
    const __m512 hi = _mm512_maskz_loadu_ps(lanes(2 * cnt - 16 > 0 ? 2 * cnt - 16 : 0), r + 16);
    *even = _mm512_permutex2var_ps(lo, ie, hi);
    *odd = _mm512_permutex2var_ps(lo, io, hi);
}

static inline void interleave_store(float *r, int64_t cnt, __m512 even, __m512 odd) {
    const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ih = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    _mm512_mask_storeu_ps(r, lanes(2 * cnt), _mm512_permutex2var_ps(even, il, odd));
    if (cnt > 8)
        _mm512_mask_storeu_ps(r + 16, lanes(2 * cnt - 16), _mm512_permutex2var_ps(even, ih, odd));
}

static void pool2_relu_fwd_row_avx512(int64_t wo, const float *r0, const float *r1, float *yr, uint8_t *cr) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t j = 0; j < wo; j += 16) {
        const int64_t cnt = wo - j < 16 ? wo - j : 16;
        __m512 a, b, c, d;
        deinterleave(r0 + 2 * j, cnt, &a, &b);
        deinterleave(r1 + 2 * j, cnt, &c, &d);
        __m512 m = a;
        __m512i k = _mm512_setzero_si512();
        __mmask16 s = _mm512_cmp_ps_mask(b, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
        m = _mm512_mask_mov_ps(m, s, b);
        k = _mm512_mask_mov_epi32(k, s, _mm512_set1_epi32(1));
        s = _mm512_cmp_ps_mask(c, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q);
        m = _mm512_mask_mov_ps(m, s, c);
        k = _mm512_mask_mov_epi32(k, s, _mm512_set1_epi32(2));
        s = _mm512_cmp_ps_mask(d, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
        m = _mm512_mask_mov_ps(m, s, d);
        k = _mm512_mask_mov_epi32(k, s, _mm512_set1_epi32(3));
        const __mmask16 pass = _mm512_cmp_ps_mask(m, zero, _CMP_NLE_UQ); /* not m <= 0: NaN passes */
        k = _mm512_mask_mov_epi32(_mm512_set1_epi32(4), pass, k);
        m = _mm512_maskz_mov_ps(pass, m);
        _mm512_mask_storeu_ps(yr + j, lanes(cnt), m);
        _mm512_mask_cvtepi32_storeu_epi8(cr + j, lanes(cnt), k);
    }
}

static inline __m512i load_codes(const uint8_t *cr, int64_t cnt) {
    return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes(cnt), cr));
}

static void pool2_bwd_row_avx512(int64_t wo, const float *g, const uint8_t *cr, float *row, int lo) {
    for (int64_t j = 0; j < wo; j += 16) {
        const int64_t cnt = wo - j < 16 ? wo - j : 16;
        const __m512 v = _mm512_maskz_loadu_ps(lanes(cnt), g + j);
        const __m512i k = load_codes(cr + j, cnt);
        const __m512 ev = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(lo)), v);
        const __m512 od = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(lo + 1)), v);
        interleave_store(row + 2 * j, cnt, ev, od);
    }
}

static void pool2_gather_row_avx512(int64_t wo, const float *r0, const float *r1, const uint8_t *cr, float *gr) {
    for (int64_t j = 0; j < wo; j += 16) {
        const int64_t cnt = wo - j < 16 ? wo - j : 16;
        __m512 a, b, c, d;
        deinterleave(r0 + 2 * j, cnt, &a, &b);
        deinterleave(r1 + 2 * j, cnt, &c, &d);
        const __m512i k = load_codes(cr + j, cnt);
        __m512 v = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(0)), a);
        v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(1)), b);
        v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(2)), c);
        v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(3)), d);
        _mm512_mask_storeu_ps(gr + j, lanes(cnt), v);
    }
}
