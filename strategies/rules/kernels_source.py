"""The C source of the compiled kernels (strategies/rules/kernels.py builds it): a string in a Python module, so it
travels wherever the Python code does (a Flower app bundle, a wheel)."""

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define W 64 /* columns per network pass: theta x 64 values stay in the L1 cache */

/* Per column c < ncols of x (row stride ld) over the `theta` rows `rows`: sort the values (the comparator network
   `pairs`), find the first and the last window of `beta` consecutive sorted values whose reach
   max(|o_a - m|, |o_(a+beta-1) - m|) around the median m is smallest, write the float64 mean of the first window
   (summed in sorted order) to out[c], and tied[c] = 1 where the two windows' far ends differ (the caller ranks
   those columns by their distances instead). The median and the reaches in the stack's precision, as numpy.
   Returns 0, or -1 where the work buffer cannot be allocated. */
#define BULYAN(NAME, T, ABS)                                                                                       \
int NAME(const T *x, int64_t ld, const int64_t *rows, int32_t theta, int64_t ncols, int32_t beta,                  \
         const int32_t *pairs, int32_t npairs, double *out, uint8_t *tied) {                                       \
    T *buf = malloc(sizeof(T) * (size_t)theta * W);                                                                \
    if (buf == NULL) return -1;                                                                                    \
    T med[W], best[W];                                                                                             \
    int32_t first[W], last[W];                                                                                     \
    const int32_t k = theta / 2, windows = theta - beta + 1;                                                       \
    for (int64_t c0 = 0; c0 < ncols; c0 += W) {                                                                    \
        const int32_t w = (int32_t)(ncols - c0 < W ? ncols - c0 : W);                                              \
        for (int32_t t = 0; t < theta; t++) {                                                                      \
            memcpy(buf + t * W, x + rows[t] * ld + c0, (size_t)w * sizeof(T));                                     \
            for (int32_t c = w; c < W; c++) buf[t * W + c] = 0;                                                    \
        }                                                                                                          \
        for (int32_t p = 0; p < npairs; p++) {                                                                     \
            T *lo = buf + pairs[2 * p] * W, *hi = buf + pairs[2 * p + 1] * W;                                      \
            for (int32_t c = 0; c < W; c++) {                                                                      \
                const T a = lo[c], b = hi[c];                                                                      \
                lo[c] = b < a ? b : a;                                                                             \
                hi[c] = b < a ? a : b;                                                                             \
            }                                                                                                      \
        }                                                                                                          \
        for (int32_t c = 0; c < W; c++) {                                                                          \
            med[c] = theta % 2 ? buf[k * W + c] : (T)(buf[(k - 1) * W + c] + buf[k * W + c]) / (T)2;               \
            best[c] = (T)INFINITY;                                                                                 \
            first[c] = 0;                                                                                          \
            last[c] = 0;                                                                                           \
        }                                                                                                          \
        for (int32_t a = 0; a < windows; a++) {                                                                    \
            const T *left = buf + a * W, *right = buf + (a + beta - 1) * W;                                        \
            for (int32_t c = 0; c < W; c++) {                                                                      \
                const T dl = ABS(left[c] - med[c]), dr = ABS(right[c] - med[c]);                                   \
                const T r = dl < dr ? dr : dl;                                                                     \
                first[c] = r < best[c] ? a : first[c];                                                             \
                best[c] = r < best[c] ? r : best[c];                                                               \
                last[c] = r <= best[c] ? a : last[c];                                                              \
            }                                                                                                      \
        }                                                                                                          \
        for (int32_t c = 0; c < w; c++) {                                                                          \
            double sum = 0.0;                                                                                      \
            for (int32_t t = first[c]; t < first[c] + beta; t++) sum += (double)buf[t * W + c];                    \
            out[c0 + c] = sum / beta;                                                                              \
            tied[c0 + c] = first[c] != last[c] && buf[first[c] * W + c] != buf[(last[c] + beta - 1) * W + c];      \
        }                                                                                                          \
    }                                                                                                              \
    free(buf);                                                                                                     \
    return 0;                                                                                                      \
}

BULYAN(bulyan_coordinates_f32, float, fabsf)
BULYAN(bulyan_coordinates_f64, double, fabs)

#define B 1024 /* columns per block: the open rows' float64 block stays in L2, one row's in L1 */
typedef double v8 __attribute__((vector_size(64))); /* GCC/Clang vectors: one AVX-512 or two AVX2 registers */

static inline v8 load8(const double *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline double total(v8 s) {
    double sum = 0.0;
    for (int l = 0; l < 8; l++) sum += s[l];
    return sum;
}

/* Four independent vector sums (FMA latency), summed in a fixed order. */
static inline double dot(const double *a, const double *b) {
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    for (int c = 0; c < B; c += 32) {
        s0 += load8(a + c) * load8(b + c);
        s1 += load8(a + c + 8) * load8(b + c + 8);
        s2 += load8(a + c + 16) * load8(b + c + 16);
        s3 += load8(a + c + 24) * load8(b + c + 24);
    }
    return total((s0 + s1) + (s2 + s3));
}

/* dst = src - centre in float64 over a block of w <= B columns (zero beyond w); returns dst . dst. */
#define CENTRED(NAME, T)                                                                                           \
static inline double NAME(double *restrict dst, const T *restrict src, const double *restrict centre, int64_t w) { \
    if (w < B) {                                                                                                   \
        for (int64_t c = 0; c < B; c++) dst[c] = c < w ? (double)src[c] - centre[c] : 0.0;                         \
        return dot(dst, dst);                                                                                      \
    }                                                                                                              \
    v8 s0 = {0}, s1 = {0};                                                                                         \
    for (int c = 0; c < B; c += 16) {                                                                              \
        v8 a, b;                                                                                                   \
        for (int l = 0; l < 8; l++) {                                                                              \
            a[l] = (double)src[c + l];                                                                             \
            b[l] = (double)src[c + 8 + l];                                                                         \
        }                                                                                                          \
        a -= load8(centre + c);                                                                                    \
        b -= load8(centre + c + 8);                                                                                \
        memcpy(dst + c, &a, sizeof a);                                                                             \
        memcpy(dst + c + 8, &b, sizeof b);                                                                         \
        s0 += a * a;                                                                                               \
        s1 += b * b;                                                                                               \
    }                                                                                                              \
    return total(s0 + s1);                                                                                         \
}

/* In float64, of y = x - centre (n x d, row stride ld; centre NULL: zero): out[i * n + j] = y[rows[i]] . y[j] for the k
   `rows` and every row j < n, and sq[j] = y[j] . y[j], in one pass over x read as it is. Products of float32
   values are exact in float64; every result is a float64 sum of d terms in a fixed order, within gamma_d of
   sum |y_ik y_jk| (the caller's bound). Returns 0, or -1 where the work buffers cannot be allocated. */
#define GRAM_ROWS(NAME, T, CENTRED_T)                                                                              \
int NAME(const T *x, int64_t n, int64_t d, int64_t ld, const T *centre, const int64_t *rows, int32_t k,            \
         double *out, double *sq) {                                                                                \
    double *open = aligned_alloc(64, sizeof(double) * (size_t)(k > 0 ? k : 1) * B);                                \
    double *row = aligned_alloc(64, sizeof(double) * B), *shift = aligned_alloc(64, sizeof(double) * B);           \
    if (open == NULL || row == NULL || shift == NULL) {                                                            \
        free(open);                                                                                                \
        free(row);                                                                                                 \
        free(shift);                                                                                               \
        return -1;                                                                                                 \
    }                                                                                                              \
    memset(out, 0, sizeof(double) * (size_t)k * (size_t)n);                                                        \
    memset(sq, 0, sizeof(double) * (size_t)n);                                                                     \
    for (int64_t c0 = 0; c0 < d; c0 += B) {                                                                        \
        const int64_t w = d - c0 < B ? d - c0 : B;                                                                 \
        for (int64_t c = 0; c < B; c++) shift[c] = centre != NULL && c < w ? (double)centre[c0 + c] : 0.0;         \
        for (int32_t i = 0; i < k; i++) CENTRED_T(open + i * B, x + rows[i] * ld + c0, shift, w);                  \
        for (int64_t j = 0; j < n; j++) {                                                                          \
            sq[j] += CENTRED_T(row, x + j * ld + c0, shift, w);                                                    \
            for (int32_t i = 0; i < k; i++) out[i * n + j] += dot(open + i * B, row);                              \
        }                                                                                                          \
    }                                                                                                              \
    free(open);                                                                                                    \
    free(row);                                                                                                     \
    free(shift);                                                                                                   \
    return 0;                                                                                                      \
}

CENTRED(centred_f32, float)
CENTRED(centred_f64, double)

/* out[i * n + j] = sum_c (x[rows[i], c] - x[j, c])^2 in float64 (n x d, row stride ld), the brute-force distance:
   the same columns go to the same partial sums in the same order for every pair, and (a - b)^2 = (b - a)^2, so
   d_ij and d_ji agree bit for bit whichever of them is a `rows` entry. Returns 0, or -1 without memory. */
#define DIRECT(NAME, T)                                                                                            \
int NAME(const T *x, int64_t n, int64_t d, int64_t ld, const int64_t *rows, int32_t k, double *out) {             \
    double *open = aligned_alloc(64, sizeof(double) * (size_t)(k > 0 ? k : 1) * B);                               \
    double *row = aligned_alloc(64, sizeof(double) * B);                                                           \
    if (open == NULL || row == NULL) {                                                                             \
        free(open);                                                                                                \
        free(row);                                                                                                 \
        return -1;                                                                                                 \
    }                                                                                                              \
    memset(out, 0, sizeof(double) * (size_t)k * (size_t)n);                                                        \
    for (int64_t c0 = 0; c0 < d; c0 += B) {                                                                        \
        const int64_t w = d - c0 < B ? d - c0 : B;                                                                 \
        for (int32_t i = 0; i < k; i++)                                                                            \
            for (int64_t c = 0; c < B; c++) open[i * B + c] = c < w ? (double)x[rows[i] * ld + c0 + c] : 0.0;      \
        for (int64_t j = 0; j < n; j++) {                                                                          \
            for (int64_t c = 0; c < B; c++) row[c] = c < w ? (double)x[j * ld + c0 + c] : 0.0;                     \
            for (int32_t i = 0; i < k; i++) {                                                                      \
                const double *a = open + i * B;                                                                    \
                v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                                         \
                for (int c = 0; c < B; c += 32) {                                                                  \
                    const v8 e0 = load8(a + c) - load8(row + c), e1 = load8(a + c + 8) - load8(row + c + 8);       \
                    const v8 e2 = load8(a + c + 16) - load8(row + c + 16);                                         \
                    const v8 e3 = load8(a + c + 24) - load8(row + c + 24);                                         \
                    s0 += e0 * e0, s1 += e1 * e1, s2 += e2 * e2, s3 += e3 * e3;                                    \
                }                                                                                                  \
                out[i * n + j] += total((s0 + s1) + (s2 + s3));                                                    \
            }                                                                                                      \
        }                                                                                                          \
    }                                                                                                              \
    free(open);                                                                                                    \
    free(row);                                                                                                     \
    return 0;                                                                                                      \
}

DIRECT(direct_rows_f32, float)
DIRECT(direct_rows_f64, double)
GRAM_ROWS(gram_rows_f32, float, centred_f32)
GRAM_ROWS(gram_rows_f64, double, centred_f64)

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
#define BC 512 /* columns per block of the float32 Gram: each of 16 lanes sums BC / 16 = 32 products in float32 */

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* lanes[0..7] += the 16 float32 lane sums of acc, in float64 (lane l + lane l + 8). */
static inline void flush(double *lanes, v16f acc) {
    /* the halves element by element: __builtin_shufflevector needs GCC 12, and taking acc's address (memcpy) makes
       GCC keep every accumulator of the tile in memory */
    const v8f lo = {acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]};
    const v8f hi = {acc[8], acc[9], acc[10], acc[11], acc[12], acc[13], acc[14], acc[15]};
    v8 s = load8(lanes);
    s += __builtin_convertvector(lo, v8) + __builtin_convertvector(hi, v8);
    memcpy(lanes, &s, sizeof s);
}

static inline void add8(double *lanes, v8 acc) {
    v8 s = load8(lanes);
    s += acc;
    memcpy(lanes, &s, sizeof s);
}

/* out (n x n, float64) = the Gram matrix of y = fl32(x - centre) (n x d, row stride ld; centre NULL: zero), symmetric:
   each pair once, in 4 x 4 tiles of rows (16 accumulators in registers), over column blocks of BC that stay in
   L2. Every float32 lane sums 32 products (gamma_32 in float32) before it is added into float64 lanes, so a result
   is within gamma_32 (u = 2^-24) + gamma_N (u = 2^-53, N = 16 ceil(d / BC) + 8 float64 terms) of sum |y_ik y_jk|.
   Returns 0, or -1 where the work buffers cannot be allocated. */
int gram_f32(const float *x, int64_t n, int64_t d, int64_t ld, const float *centre, double *out) {
    const int64_t np = (n + 3) / 4 * 4;
    float *y = aligned_alloc(64, sizeof(float) * (size_t)np * BC);
    double *lanes = calloc((size_t)np * (size_t)np * 8, sizeof(double));
    if (y == NULL || lanes == NULL) {
        free(y);
        free(lanes);
        return -1;
    }
    for (int64_t c0 = 0; c0 < d; c0 += BC) {
        const int64_t w = d - c0 < BC ? d - c0 : BC;
        for (int64_t r = 0; r < np; r++) {
            float *dst = y + r * BC;
            const float *src = x + r * ld + c0;
            if (r >= n)
                memset(dst, 0, sizeof(float) * BC);
            else if (w == BC && centre != NULL)
                for (int c = 0; c < BC; c++) dst[c] = src[c] - centre[c0 + c];
            else if (w == BC)
                memcpy(dst, src, sizeof(float) * BC);
            else
                for (int64_t c = 0; c < BC; c++) dst[c] = c < w ? src[c] - (centre ? centre[c0 + c] : 0.0f) : 0.0f;
        }
        for (int64_t I = 0; I < np; I += 4)
            for (int64_t J = I; J < np; J += 4) {
                v16f a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
                v16f a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
                const float *p0 = y + I * BC, *p1 = p0 + BC, *p2 = p1 + BC, *p3 = p2 + BC;
                const float *q0 = y + J * BC, *q1 = q0 + BC, *q2 = q1 + BC, *q3 = q2 + BC;
                for (int64_t c = 0; c < BC; c += 16) {
                    const v16f y0 = load16(q0 + c), y1 = load16(q1 + c), y2 = load16(q2 + c), y3 = load16(q3 + c);
                    v16f r = load16(p0 + c);
                    a00 += r * y0, a01 += r * y1, a02 += r * y2, a03 += r * y3;
                    r = load16(p1 + c);
                    a10 += r * y0, a11 += r * y1, a12 += r * y2, a13 += r * y3;
                    r = load16(p2 + c);
                    a20 += r * y0, a21 += r * y1, a22 += r * y2, a23 += r * y3;
                    r = load16(p3 + c);
                    a30 += r * y0, a31 += r * y1, a32 += r * y2, a33 += r * y3;
                }
                double *l = lanes + (I * np + J) * 8;
                flush(l, a00), flush(l + 8, a01), flush(l + 16, a02), flush(l + 24, a03);
                l += np * 8;
                flush(l, a10), flush(l + 8, a11), flush(l + 16, a12), flush(l + 24, a13);
                l += np * 8;
                flush(l, a20), flush(l + 8, a21), flush(l + 16, a22), flush(l + 24, a23);
                l += np * 8;
                flush(l, a30), flush(l + 8, a31), flush(l + 16, a32), flush(l + 24, a33);
            }
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = i; j < n; j++) {
            const double *l = lanes + (i * np + j) * 8; /* i <= j: in a tile (I <= J) that holds the pair (i, j) */
            out[i * n + j] = out[j * n + i] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        }
    free(y);
    free(lanes);
    return 0;
}

#define BD 256 /* columns per block of the float64 Gram: 100 rows of it stay in L2 */

/* out (n x n) = the Gram matrix of y = x - centre in float64 (products and sums; n x d, row stride ld; centre NULL:
   zero), symmetric, in 4 x 4 tiles of rows as gram_f32: every result is a float64 sum of d products in a fixed
   order, within gamma_d of sum |y_ik y_jk|. Returns 0, or -1 where the work buffers cannot be allocated. */
#define GRAM64(NAME, T)                                                                                            \
int NAME(const T *x, int64_t n, int64_t d, int64_t ld, const T *centre, double *out) {                             \
    const int64_t np = (n + 3) / 4 * 4;                                                                            \
    double *y = aligned_alloc(64, sizeof(double) * (size_t)np * BD);                                               \
    double *lanes = calloc((size_t)np * (size_t)np * 8, sizeof(double));                                           \
    if (y == NULL || lanes == NULL) {                                                                              \
        free(y);                                                                                                   \
        free(lanes);                                                                                               \
        return -1;                                                                                                 \
    }                                                                                                              \
    for (int64_t c0 = 0; c0 < d; c0 += BD) {                                                                       \
        const int64_t w = d - c0 < BD ? d - c0 : BD;                                                               \
        for (int64_t r = 0; r < np; r++) {                                                                         \
            double *dst = y + r * BD;                                                                              \
            const T *src = x + r * ld + c0;                                                                        \
            if (r >= n)                                                                                            \
                memset(dst, 0, sizeof(double) * BD);                                                               \
            else if (w == BD && centre != NULL)                                                                    \
                for (int c = 0; c < BD; c++) dst[c] = (double)src[c] - (double)centre[c0 + c];                     \
            else if (w == BD)                                                                                      \
                for (int c = 0; c < BD; c++) dst[c] = (double)src[c];                                              \
            else                                                                                                   \
                for (int64_t c = 0; c < BD; c++)                                                                   \
                    dst[c] = c < w ? (double)src[c] - (centre ? (double)centre[c0 + c] : 0.0) : 0.0;               \
        }                                                                                                          \
        for (int64_t I = 0; I < np; I += 4)                                                                        \
            for (int64_t J = I; J < np; J += 4) {                                                                  \
                v8 a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};         \
                v8 a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};         \
                const double *p0 = y + I * BD, *p1 = p0 + BD, *p2 = p1 + BD, *p3 = p2 + BD;                        \
                const double *q0 = y + J * BD, *q1 = q0 + BD, *q2 = q1 + BD, *q3 = q2 + BD;                        \
                for (int64_t c = 0; c < BD; c += 8) {                                                              \
                    const v8 y0 = load8(q0 + c), y1 = load8(q1 + c), y2 = load8(q2 + c), y3 = load8(q3 + c);       \
                    v8 r = load8(p0 + c);                                                                          \
                    a00 += r * y0, a01 += r * y1, a02 += r * y2, a03 += r * y3;                                    \
                    r = load8(p1 + c);                                                                             \
                    a10 += r * y0, a11 += r * y1, a12 += r * y2, a13 += r * y3;                                    \
                    r = load8(p2 + c);                                                                             \
                    a20 += r * y0, a21 += r * y1, a22 += r * y2, a23 += r * y3;                                    \
                    r = load8(p3 + c);                                                                             \
                    a30 += r * y0, a31 += r * y1, a32 += r * y2, a33 += r * y3;                                    \
                }                                                                                                  \
                double *l = lanes + (I * np + J) * 8;                                                              \
                add8(l, a00), add8(l + 8, a01), add8(l + 16, a02), add8(l + 24, a03);                              \
                l += np * 8;                                                                                       \
                add8(l, a10), add8(l + 8, a11), add8(l + 16, a12), add8(l + 24, a13);                              \
                l += np * 8;                                                                                       \
                add8(l, a20), add8(l + 8, a21), add8(l + 16, a22), add8(l + 24, a23);                              \
                l += np * 8;                                                                                       \
                add8(l, a30), add8(l + 8, a31), add8(l + 16, a32), add8(l + 24, a33);                              \
            }                                                                                                      \
    }                                                                                                              \
    for (int64_t i = 0; i < n; i++)                                                                                \
        for (int64_t j = i; j < n; j++) {                                                                          \
            const double *l = lanes + (i * np + j) * 8;                                                            \
            out[i * n + j] = out[j * n + i] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));   \
        }                                                                                                          \
    free(y);                                                                                                       \
    free(lanes);                                                                                                   \
    return 0;                                                                                                      \
}

GRAM64(gram_f64_from_f32, float)
GRAM64(gram_f64_from_f64, double)
"""
