/* Kernel bodies, included twice by fastops.c: once with REAL = float, once with REAL = double.
   Every array is C-contiguous (NCHW); the Python side (pipeline/meta/native.py) guarantees it. */

/* ---- 2x2 max-pool (stride 2, floor) fused with the ReLU that follows it ---------------------------
   y = relu(max of the window). code = position of the max in the window (0..3, row-major; ties and NaN
   resolved exactly as ATen's CPU max_pool2d: `val > max || isnan(val)`, so the first of equal values and
   the last NaN win), or 4 where the ReLU blocks the gradient (max <= 0; torch's ReLU lets a NaN through). */
void FN(pool2_relu_fwd)(int64_t planes, int64_t h, int64_t w, const REAL *x, REAL *y, uint8_t *code) {
    const int64_t ho = h / 2, wo = w / 2;
    for (int64_t p = 0; p < planes; ++p) {
        for (int64_t i = 0; i < ho; ++i) {
            const REAL *restrict r0 = x + (p * h + 2 * i) * w, *restrict r1 = r0 + w;
            REAL *restrict yr = y + (p * ho + i) * wo;
            uint8_t *restrict cr = code + (p * ho + i) * wo;
#ifdef FEWSCAN_POOL_SIMD
            if (sizeof(REAL) == sizeof(float)) {
                pool2_relu_fwd_row_avx512(wo, (const float *)r0, (const float *)r1, (float *)yr, cr);
                continue;
            }
#endif
            /* Written so that the compiler vectorises it (if-converted selects): starting from the first
               element, a later one replaces the running max when it is greater or NaN (ATen's rule). */
            for (int64_t j = 0; j < wo; ++j) {
                const REAL a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
                REAL m = a;
                int k = 0;
                if (b > m || b != b) {
                    m = b;
                    k = 1;
                }
                if (c > m || c != c) {
                    m = c;
                    k = 2;
                }
                if (d > m || d != d) {
                    m = d;
                    k = 3;
                }
                if (m <= 0) { /* ReLU blocks the gradient; a NaN passes, as in torch's threshold_backward */
                    k = 4;
                    m = 0;
                }
                yr[j] = m;
                cr[j] = (uint8_t)k;
            }
        }
    }
}

/* One input row of the backward: gy goes to the column of the window position (lo or lo + 1). */
static void FN(pool2_bwd_row)(int64_t wo, const REAL *restrict g, const uint8_t *restrict cr, REAL *restrict row, int lo) {
    for (int64_t j = 0; j < wo; ++j) {
        const REAL v = g[j];
        const int k = cr[j];
        const REAL ev = k == lo ? v : (REAL)0;
        const REAL od = k == lo + 1 ? v : (REAL)0;
        row[2 * j] = ev;
        row[2 * j + 1] = od;
    }
}

/* gx (planes, h, w) from gy (planes, h/2, w/2): gy goes to the recorded position, zeros elsewhere
   (the odd last row / column of a floor-mode pool included). Writes every element of gx once. */
void FN(pool2_relu_bwd)(int64_t planes, int64_t h, int64_t w, const REAL *gy, const uint8_t *code, REAL *gx) {
    const int64_t ho = h / 2, wo = w / 2;
    for (int64_t p = 0; p < planes; ++p) {
        REAL *xp = gx + p * h * w;
        for (int64_t i = 0; i < ho; ++i) {
            const REAL *gr = gy + (p * ho + i) * wo;
            const uint8_t *cr = code + (p * ho + i) * wo;
            REAL *r0 = xp + (2 * i) * w, *r1 = r0 + w;
#ifdef FEWSCAN_POOL_SIMD
            if (sizeof(REAL) == sizeof(float)) {
                pool2_bwd_row_avx512(wo, (const float *)gr, cr, (float *)r0, 0);
                pool2_bwd_row_avx512(wo, (const float *)gr, cr, (float *)r1, 2);
            } else
#endif
            {
                FN(pool2_bwd_row)(wo, gr, cr, r0, 0);
                FN(pool2_bwd_row)(wo, gr, cr, r1, 2);
            }
            if (w & 1) {
                r0[w - 1] = 0;
                r1[w - 1] = 0;
            }
        }
        if (h & 1)
            memset(xp + (h - 1) * w, 0, (size_t)w * sizeof(REAL));
    }
}

/* The derivative of pool2_relu_bwd with respect to gy: gather ggx at the recorded positions. */
void FN(pool2_relu_gather)(int64_t planes, int64_t h, int64_t w, const REAL *ggx, const uint8_t *code, REAL *ggy) {
    const int64_t ho = h / 2, wo = w / 2;
    for (int64_t p = 0; p < planes; ++p) {
        for (int64_t i = 0; i < ho; ++i) {
            const REAL *restrict r0 = ggx + (p * h + 2 * i) * w, *restrict r1 = r0 + w;
            const uint8_t *restrict cr = code + (p * ho + i) * wo;
            REAL *restrict gr = ggy + (p * ho + i) * wo;
#ifdef FEWSCAN_POOL_SIMD
            if (sizeof(REAL) == sizeof(float)) {
                pool2_gather_row_avx512(wo, (const float *)r0, (const float *)r1, cr, (float *)gr);
                continue;
            }
#endif
            for (int64_t j = 0; j < wo; ++j) {
                const int k = cr[j];
                const REAL a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
                REAL v = k == 0 ? a : (REAL)0;
                v = k == 1 ? b : v;
                v = k == 2 ? c : v;
                v = k == 3 ? d : v;
                gr[j] = v;
            }
        }
    }
}

/* ---- GroupNorm double backward --------------------------------------------------------------------
   The derivative of (gy, x, gamma) -> (gx, ggamma, gbeta) of GroupNorm, applied to the incoming
   (ggx = e, gggamma = delta, ggbeta = b); any of the three may be NULL. Derivation and the same formulas
   as torch ops: fastops.py, _GroupNormBackward.backward. Two passes over each (sample, group): per-channel
   sums (accumulated in double), then one elementwise pass writing g_gy and g_x. g_w is accumulated over
   the samples into (c,) (the caller zeroes it). out_gx / out_gw may be NULL when not needed. */
void FN(gn_double_backward)(int64_t n, int64_t c, int64_t groups, int64_t hw, const REAL *gy, const REAL *x,
                            const REAL *mean, const REAL *rstd, const REAL *gamma, const REAL *e,
                            const REAL *delta, const REAL *b, REAL *out_ggy, REAL *out_gx, REAL *out_gw) {
    const int64_t d = c / groups;
    const double m = (double)(d * hw);
    double sy[d], syx[d], se[d], sex[d], sye[d];
    for (int64_t ni = 0; ni < n; ++ni) {
        for (int64_t gi = 0; gi < groups; ++gi) {
            const int64_t base = (ni * c + gi * d) * hw;
            const double mu = (double)mean[ni * groups + gi], r = (double)rstd[ni * groups + gi];
            for (int64_t j = 0; j < d; ++j) {
                const REAL *yj = gy + base + j * hw, *xj = x + base + j * hw;
                const REAL *ej = e ? e + base + j * hw : NULL;
                double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0;
                if (ej) {
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4)
                    for (int64_t s = 0; s < hw; ++s) {
                        const double xh = ((double)xj[s] - mu) * r, yv = yj[s], ev = ej[s];
                        a0 += yv;
                        a1 += yv * xh;
                        a2 += ev;
                        a3 += ev * xh;
                        a4 += yv * ev;
                    }
                } else {
#pragma omp simd reduction(+ : a0, a1)
                    for (int64_t s = 0; s < hw; ++s) {
                        const double xh = ((double)xj[s] - mu) * r, yv = yj[s];
                        a0 += yv;
                        a1 += yv * xh;
                    }
                }
                sy[j] = a0, syx[j] = a1, se[j] = a2, sex[j] = a3, sye[j] = a4;
            }
            double s_e = 0, s_ex = 0, s_u = 0, s_ux = 0, s_eu = 0, s_yd = 0, s_yxd = 0;
            for (int64_t j = 0; j < d; ++j) {
                const double gm = gamma[gi * d + j];
                s_e += se[j], s_ex += sex[j];
                s_u += gm * sy[j], s_ux += gm * syx[j], s_eu += gm * sye[j];
                if (delta) {
                    s_yd += delta[gi * d + j] * sy[j];
                    s_yxd += delta[gi * d + j] * syx[j];
                }
            }
            const double s = s_eu - s_e * s_u / m - s_ex * s_ux / m;
            const double k = r * r / m;
            const double coef_e = -k * s_ux, coef_xh = -k * (s - 2 * s_ux * s_ex / m);
            const double cst = k * (s_ux * s_e + s_ex * s_u) / m;
            for (int64_t j = 0; j < d; ++j) {
                const int64_t ch = gi * d + j;
                const double gm = gamma[ch];
                const double dl = delta ? (double)delta[ch] : 0.0, bb = b ? (double)b[ch] : 0.0;
                /* g_gy = b + gamma r (e - s_e/m - s_ex/m xh) + delta xh  =  A + B xh + C e */
                const double gy_a = bb - (e ? gm * r * s_e / m : 0.0);
                const double gy_b = dl - (e ? gm * r * s_ex / m : 0.0);
                const double gy_c = e ? gm * r : 0.0;
                /* g_x = const + coef_e e + coef_y gy + coef_xh xh  (ggx terms)
                       + r dl gy - r s_yd/m - r s_yxd/m xh           (ggw terms) */
                const double gx_a = (e ? cst : 0.0) - (delta ? r * s_yd / m : 0.0);
                const double gx_b = (e ? coef_xh : 0.0) - (delta ? r * s_yxd / m : 0.0);
                const double gx_c = e ? coef_e : 0.0;
                const double gx_y = (e ? -k * s_ex * gm : 0.0) + (delta ? r * dl : 0.0);
                const REAL *yj = gy + base + j * hw, *xj = x + base + j * hw;
                const REAL *ej = e ? e + base + j * hw : NULL;
                REAL *oy = out_ggy + base + j * hw;
                REAL *ox = out_gx ? out_gx + base + j * hw : NULL;
                if (ej) {
                    if (ox) {
#pragma omp simd
                        for (int64_t s = 0; s < hw; ++s) {
                            const double xh = ((double)xj[s] - mu) * r, ev = ej[s];
                            oy[s] = (REAL)(gy_a + gy_b * xh + gy_c * ev);
                            ox[s] = (REAL)(gx_a + gx_b * xh + gx_c * ev + gx_y * (double)yj[s]);
                        }
                    } else {
#pragma omp simd
                        for (int64_t s = 0; s < hw; ++s) {
                            const double xh = ((double)xj[s] - mu) * r;
                            oy[s] = (REAL)(gy_a + gy_b * xh + gy_c * (double)ej[s]);
                        }
                    }
                    if (out_gw)
                        out_gw[ch] += (REAL)(r * (sye[j] - (s_e / m) * sy[j] - (s_ex / m) * syx[j]));
                } else {
#pragma omp simd
                    for (int64_t s = 0; s < hw; ++s) {
                        const double xh = ((double)xj[s] - mu) * r;
                        oy[s] = (REAL)(gy_a + gy_b * xh);
                        if (ox)
                            ox[s] = (REAL)(gx_a + gx_b * xh + gx_y * (double)yj[s]);
                    }
                }
            }
        }
    }
}

/* ---- GroupNorm fused with the 2x2 max-pool + ReLU that follows it (Conv-4 blocks) ------------------
   Forward: y = relu(maxpool(groupnorm(x))), plus the pool code and the group statistics (mean, rstd =
   1/sqrt(biased var + eps), as native_group_norm returns them). The normalised tensor is never written
   to memory: each channel is normalised into an L1-sized scratch plane and pooled from there. Statistics
   are accumulated in double. Returns 0, or -1 if the scratch could not be allocated. */
int FN(gn_pool_relu_fwd)(int64_t n, int64_t c, int64_t groups, int64_t h, int64_t w, double eps, const REAL *x,
                         const REAL *gamma, const REAL *beta, REAL *y, uint8_t *code, REAL *mean, REAL *rstd) {
    const int64_t d = c / groups, hw = h * w, ohw = (h / 2) * (w / 2);
    REAL *buf = (REAL *)malloc((size_t)hw * sizeof(REAL));
    if (!buf)
        return -1;
    for (int64_t ni = 0; ni < n; ++ni) {
        for (int64_t gi = 0; gi < groups; ++gi) {
            const REAL *xg = x + (ni * c + gi * d) * hw;
            const int64_t m = d * hw;
            /* two passes (mean, then squared deviations: no cancellation; the group is cache-resident);
               vector lanes in REAL within a channel, channels summed in double */
            double s1 = 0, s2 = 0;
            for (int64_t j = 0; j < d; ++j) {
                REAL a = 0;
#pragma omp simd reduction(+ : a)
                for (int64_t e = 0; e < hw; ++e)
                    a += xg[j * hw + e];
                s1 += (double)a;
            }
            const double mu = s1 / (double)m;
            const REAL mu_r = (REAL)mu;
            for (int64_t j = 0; j < d; ++j) {
                REAL a = 0;
#pragma omp simd reduction(+ : a)
                for (int64_t e = 0; e < hw; ++e) {
                    const REAL dv = xg[j * hw + e] - mu_r;
                    a += dv * dv;
                }
                s2 += (double)a;
            }
            const double r = 1.0 / sqrt(s2 / (double)m + eps);
            mean[ni * groups + gi] = (REAL)mu;
            rstd[ni * groups + gi] = (REAL)r;
            for (int64_t j = 0; j < d; ++j) {
                const int64_t ch = gi * d + j;
                const REAL sc = (REAL)((double)gamma[ch] * r);
                const REAL sh = (REAL)((double)beta[ch] - mu * (double)gamma[ch] * r);
                const REAL *xp = xg + j * hw;
#pragma omp simd
                for (int64_t e = 0; e < hw; ++e)
                    buf[e] = xp[e] * sc + sh;
                FN(pool2_relu_fwd)(1, h, w, buf, y + (ni * c + ch) * ohw, code + (ni * c + ch) * ohw);
            }
        }
    }
    free(buf);
    return 0;
}

/* Backward of gn_pool_relu_fwd for a first-order backward (the second-order path composes the two
   differentiable backward Functions in Python): gy (n, c, h/2, w/2) -> gx (n, c, h, w), and the weight /
   bias gradients accumulated into gw, gb (c,) (the caller zeroes them). Per (sample, group) the pool's
   scatter of gy goes to a scratch block (L1/L2-sized) instead of a full-size tensor in memory; then
       gx = r * (gamma * g - A - xh * B),  A = sum(gamma * g) / M,  B = sum(gamma * g * xh) / M
   over the group (g the scattered gradient, xh the normalised input), as native_group_norm_backward. */
int FN(gn_pool_relu_bwd)(int64_t n, int64_t c, int64_t groups, int64_t h, int64_t w, const REAL *gy,
                         const uint8_t *code, const REAL *x, const REAL *mean, const REAL *rstd, const REAL *gamma,
                         REAL *gx, REAL *gw, REAL *gb) {
    const int64_t d = c / groups, hw = h * w, ohw = (h / 2) * (w / 2);
    REAL *buf = (REAL *)malloc((size_t)(d * hw) * sizeof(REAL));
    if (!buf)
        return -1;
    for (int64_t ni = 0; ni < n; ++ni) {
        for (int64_t gi = 0; gi < groups; ++gi) {
            const int64_t base = (ni * c + gi * d) * hw;
            const double mu = (double)mean[ni * groups + gi], r = (double)rstd[ni * groups + gi];
            const REAL mu_r = (REAL)mu, r_r = (REAL)r;
            const int64_t obase = (ni * c + gi * d) * ohw;
            FN(pool2_relu_bwd)(d, h, w, gy + obase, code + obase, buf);
            double sa = 0, sb = 0;
            for (int64_t j = 0; j < d; ++j) {
                const REAL *g = buf + j * hw, *xp = x + base + j * hw;
                REAL a0 = 0, a1 = 0; /* vector lanes in REAL within a channel; channels summed in double */
#pragma omp simd reduction(+ : a0, a1)
                for (int64_t e = 0; e < hw; ++e) {
                    const REAL gv = g[e];
                    a0 += gv;
                    a1 += gv * ((xp[e] - mu_r) * r_r);
                }
                const int64_t ch = gi * d + j;
                gb[ch] += (REAL)a0;
                gw[ch] += (REAL)a1;
                sa += (double)gamma[ch] * a0;
                sb += (double)gamma[ch] * a1;
            }
            const double m = (double)(d * hw);
            const REAL ca = (REAL)(-r * sa / m), cb = (REAL)(-r * sb / m);
            for (int64_t j = 0; j < d; ++j) {
                const REAL gs = (REAL)(r * (double)gamma[gi * d + j]);
                const REAL *g = buf + j * hw, *xp = x + base + j * hw;
                REAL *o = gx + base + j * hw;
#pragma omp simd
                for (int64_t e = 0; e < hw; ++e)
                    o[e] = gs * g[e] + ca + cb * ((xp[e] - mu_r) * r_r);
            }
        }
    }
    free(buf);
    return 0;
}
