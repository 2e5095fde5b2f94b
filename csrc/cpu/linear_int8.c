/* quantkit CPU kernels for the int8 Linear: exact int8 x int8 -> int32 products and the fused
 * int8-weight float32 product. Plain C ABI (loaded with ctypes by quantkit/backends/native_cpu.py).
 *
 * Every entry point takes a `path`: QK_PATH_GENERIC (portable C, any CPU), QK_PATH_AVX2 (AVX2 +
 * FMA intrinsics), QK_PATH_VNNI (AVX-512 BW/VL + VNNI for the int8 products; the weight-only
 * product takes an AVX-512 form of the "lanes" kernel below QK_W8_PACKED_MIN_ROWS rows and the
 * AVX2 kernels otherwise) or QK_PATH_AMX (AMX-INT8 tiles for the int8 products, block scales
 * with blocks of a multiple of 64, Linux only; the rest runs as on QK_PATH_VNNI), chosen at run
 * time and refused with QK_ERR_UNSUPPORTED on a CPU without the features. All paths of a product
 * give identical bits, NaN payloads aside: a NaN result is NaN on every path, but where two NaNs
 * meet in one operation (a NaN scale and a NaN bias, say) which payload survives depends on the
 * operand order the compiler chose for that path, as IEEE 754 leaves it open:
 *
 *   qk_cpu_gemm_s8s8s32:  C[i][j] = sum_k A[i][k] * B[j][k]          (exact int32)
 *       A (M, K) and B (N, K) int8 rows, codes in [-127, 127] (DESIGN.md section 1 never makes
 *       -128). AVX2 has no exact signed x signed byte product; it uses
 *       |a| * (b * sign(a)) with vpmaddubsw (unsigned x signed byte pairs summed into int16:
 *       at most 2 * 127 * 127 = 32258 in magnitude, so never saturated), then vpmaddwd by ones
 *       into int32. VNNI has only unsigned x signed byte products too (vpdpbusd, four of them
 *       summed into each int32 lane); it takes a' = a + 128 (a XOR 0x80, in [1, 255]) and
 *       subtracts the weight row's sum: sum_k a'[k] b[k] - 128 sum_k b[k] = sum_k a[k] b[k]. Both
 *       sums wrap modulo 2^32 at worst, and the difference is the true sum whenever that fits in
 *       int32 (|C| <= 127^2 K, any K below 133144). The weight row sums are a property of the
 *       weight: a caller that keeps them passes `bsum` (bsum[j] = sum_k B[j][k], exact in int32
 *       for K up to 2^24); with bsum NULL each call computes them, one more vpdpbusd pass
 *       over B (as much work as the product itself at one row of A). AMX has a signed x signed
 *       tile product (tdpbssd): no offset, the codes go in as they are (section AMX below).
 *
 *   qk_cpu_linear_w8a8_f32: Y[i][j] = float32(C[i][j]) * (sx[i] * sw[j]) + bias[j], C as above,
 *       each float32 operation rounded once in that order (the W8A8 rescale of DESIGN.md
 *       section 6), without writing C to memory.
 *
 *   qk_cpu_linear_w8_f32: Y[i][j] = float32(dot_k(X[i][k], float32(W[j][k]))) * s[j] + bias[j]
 *       dot_k in float32, one fused multiply-add per term, in a fixed order that depends only on
 *       M (the number of rows of X) and K:
 *       - M < QK_W8_PACKED_MIN_ROWS ("lanes", reads each weight byte once per call): eight lane
 *         sums, lane l holding k = 8t + l for t = 0, 1, ..., reduced as
 *         ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), then the K % 8 tail terms fused onto
 *         that sum in order;
 *       - M >= QK_W8_PACKED_MIN_ROWS ("chain", sixteen weight rows at a time converted to float32
 *         into a small panel, then broadcast-FMA over six rows of X): one chain
 *         s = fma(x[k], w[k], s) for k = 0, 1, ..., K - 1 from s = 0.
 *       The scale product and the bias add are each rounded once (no contraction).
 *
 *   Block-scaled weights (one scale per block of `block` consecutive weights of a row, S[j][g] for
 *   k in [g * block, (g + 1) * block); block a multiple of 8 dividing K):
 *
 *   qk_cpu_linear_w8b_f32: Y[i][j] = float32(dot_k(X[i][k], float32(W[j][k]) * S[j][k / block]))
 *       + bias[j], the weight dequantized (one rounding) before its fused multiply-add, in the
 *       eight-lane order above for every M.
 *
 *   qk_cpu_linear_w8a8b_f32: Y[i][j] = t[i][j] * sx[i] + bias[j] with t = 0 and, for g = 0, 1, ...,
 *       t = t + float32(C_g[i][j]) * S[j][g], C_g the exact int32 product over block g (every
 *       float32 operation rounded once, in that order).
 *
 * Work is split over the N outputs (rows of B / W) between `threads` OpenMP threads.
 */
#define _GNU_SOURCE   /* syscall(), for the AMX permission request */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#include <immintrin.h>
/* The AMX kernels: Linux (which grants the tile state per process), a compiler that knows AMX;
 * -DQK_NO_AMX leaves them out (csrc/build.py retries with it where the assembler lacks AMX). */
#if defined(__x86_64__) && defined(__linux__) && !defined(QK_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define QK_HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define QK_CPU_ABI_VERSION 5
#define QK_PATH_GENERIC 0
#define QK_PATH_AVX2 1
#define QK_PATH_VNNI 2
#define QK_PATH_AMX 3
#define QK_OK 0
#define QK_ERR_UNSUPPORTED 1
#define QK_ERR_ARGUMENT 2
#define QK_ERR_MEMORY 3

#define QK_FEATURE_AVX2 1          /* avx2 and fma */
#define QK_FEATURE_AVX512 2        /* avx512f, avx512bw, avx512vl */
#define QK_FEATURE_AVX512_VNNI 4
#define QK_FEATURE_AMX_INT8 8      /* amx-tile and amx-int8, granted by the OS */

#define EXPORT __attribute__((visibility("default")))

EXPORT int qk_cpu_abi_version(void) { return QK_CPU_ABI_VERSION; }

#ifdef QK_HAVE_AMX
static int amx_usable(void);
#endif

EXPORT int qk_cpu_features(void) {
    int f = 0;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f |= QK_FEATURE_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl")) f |= QK_FEATURE_AVX512;
    if (__builtin_cpu_supports("avx512vnni")) f |= QK_FEATURE_AVX512_VNNI;
#endif
#ifdef QK_HAVE_AMX
    if (amx_usable()) f |= QK_FEATURE_AMX_INT8;
#endif
    return f;
}

static int path_supported(int path) {
    int f = qk_cpu_features();
    if (path == QK_PATH_GENERIC) return 1;
    if (path == QK_PATH_AVX2) return (f & QK_FEATURE_AVX2) != 0;
    if (path == QK_PATH_VNNI)
        return (f & QK_FEATURE_AVX2) && (f & QK_FEATURE_AVX512) && (f & QK_FEATURE_AVX512_VNNI);
    if (path == QK_PATH_AMX)   /* the block-scaled product takes the VNNI kernel on this path */
        return (f & QK_FEATURE_AVX2) && (f & QK_FEATURE_AVX512) && (f & QK_FEATURE_AVX512_VNNI)
               && (f & QK_FEATURE_AMX_INT8);
    return 0;
}

/* Rows of B (or W) per work item: a multiple of 4, the micro-kernel's width, and the width of the
 * weight-only panel. */
#define N_BLOCK 16
/* From this many rows of X on, the weight-only product takes the "chain" order (header comment). */
#define QK_W8_PACKED_MIN_ROWS 32
/* k per weight-only panel: 16 rows x 512 float32 = 32 KiB. */
#define W8_KC 512
/* Rows of X per weight-only micro-tile: 6 x 16 outputs in 12 ymm accumulators. */
#define W8_MR 6
/* Rows of X per weight-only call of the chain kernel (the panel is converted once per call). */
#define W8_M_BLOCK 96
/* K per cache block of the int8 product: two A rows and four B rows of it stay in L1. */
#define K_BLOCK 2048
/* Rows of A per cache block of the int8 product (even), read once per INT8_N_BLOCK rows of B. */
#define M_BLOCK 64
/* Rows of B per work item of the int8 products (a multiple of 4). */
#define INT8_N_BLOCK 64

/* ------------------------------------------------------------------------------ generic */

static void gemm_generic_block(int64_t M, int64_t j0, int64_t j1, int64_t K, const int8_t *A,
                               int64_t lda, const int8_t *B, int64_t ldb, int32_t *C, int64_t ldc) {
    for (int64_t i = 0; i < M; i++) {
        const int8_t *a = A + i * lda;
        for (int64_t j = j0; j < j1; j++) {
            const int8_t *b = B + j * ldb;
            int32_t s = 0;
            for (int64_t k = 0; k < K; k++) s += (int32_t)a[k] * (int32_t)b[k];
            C[i * ldc + j] = s;
        }
    }
}

/* dot_k in the order of the header comment, portable C (fmaf is one rounding, as vfmadd). */
static float dot_w8_generic(const float *x, const int8_t *w, int64_t K) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k8 = K - K % 8;
    for (int64_t k = 0; k < k8; k += 8)
        for (int l = 0; l < 8; l++) lane[l] = fmaf(x[k + l], (float)w[k + l], lane[l]);
    float lo = (lane[0] + lane[1]) + (lane[2] + lane[3]);
    float hi = (lane[4] + lane[5]) + (lane[6] + lane[7]);
    float s = lo + hi;
    for (int64_t k = k8; k < K; k++) s = fmaf(x[k], (float)w[k], s);
    return s;
}

static float dot_w8_chain_generic(const float *x, const int8_t *w, int64_t K) {
    float s = 0.0f;
    for (int64_t k = 0; k < K; k++) s = fmaf(x[k], (float)w[k], s);
    return s;
}

static void w8_generic_block(int64_t M, int64_t j0, int64_t j1, int64_t K, const float *X,
                             int64_t ldx, const int8_t *W, int64_t ldw, const float *scale,
                             const float *bias, float *Y, int64_t ldy) {
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = j0; j < j1; j++) {
            float d = M >= QK_W8_PACKED_MIN_ROWS ? dot_w8_chain_generic(X + i * ldx, W + j * ldw, K)
                                                 : dot_w8_generic(X + i * ldx, W + j * ldw, K);
            float y = d * scale[j];
            Y[i * ldy + j] = bias ? y + bias[j] : y;
        }
}

/* dot_k(x[k], float32(w[k]) * s[k / block]) in the eight-lane order (K a multiple of 8). */
static float dot_w8b_generic(const float *x, const int8_t *w, const float *s, int64_t K,
                             int64_t block) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t k = 0; k < K; k += 8) {
        float sk = s[k / block];
        for (int l = 0; l < 8; l++) lane[l] = fmaf(x[k + l], (float)w[k + l] * sk, lane[l]);
    }
    float lo = (lane[0] + lane[1]) + (lane[2] + lane[3]);
    float hi = (lane[4] + lane[5]) + (lane[6] + lane[7]);
    return lo + hi;
}

static void w8b_generic_block(int64_t M, int64_t j0, int64_t j1, int64_t K, const float *X,
                              int64_t ldx, const int8_t *W, int64_t ldw, const float *S,
                              int64_t block, const float *bias, float *Y, int64_t ldy) {
    int64_t groups = K / block;
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = j0; j < j1; j++) {
            float d = dot_w8b_generic(X + i * ldx, W + j * ldw, S + j * groups, K, block);
            Y[i * ldy + j] = bias ? d + bias[j] : d;
        }
}

/* ------------------------------------------------------------------------------- AVX2 */

#if defined(__x86_64__)
#define AVX2 __attribute__((target("avx2,fma")))

/* acc += |a| * (b * sign(a)) summed in pairs, then in fours, into int32 lanes. */
AVX2 static inline __m256i madd_s8(__m256i acc, __m256i abs_a, __m256i a, __m256i b,
                                   __m256i ones) {
    __m256i p = _mm256_maddubs_epi16(abs_a, _mm256_sign_epi8(b, a));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
}

/* The four int32 lane sums of v0..v3 (any order of the lanes: integer sums are exact). */
AVX2 static inline __m128i hsum4_epi32(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
    __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

static inline int32_t dot_s8_tail(const int8_t *a, const int8_t *b, int64_t k0, int64_t k1) {
    int32_t s = 0;
    for (int64_t k = k0; k < k1; k++) s += (int32_t)a[k] * (int32_t)b[k];
    return s;
}

/* The tiles that read their four weight rows once or a few times (few rows of A or X: bound by
 * reading the weight) prefetch, at every 64th byte k, that line of the next four rows (`next`,
 * when not NULL) into L2, so that group streams in while this one is multiplied. Always inlined:
 * GCC finds a separate function of prefetches free of side effects and drops its calls. */
AVX2 static inline __attribute__((always_inline)) void prefetch_rows4(const int8_t *next,
                                                                      int64_t ld, int64_t k) {
    if (next && (k & 63) == 0)
        for (int q = 0; q < 4; q++)
            _mm_prefetch((const char *)(next + q * ld + k), _MM_HINT_T1);
}

/* C[i][j0..j0+3] (+)= A[i] . B[j0..j0+3] over k in [k0, k1), for rows i and i + 1 (two_rows). */
AVX2 static void gemm_avx2_tile(const int8_t *a0, const int8_t *a1, const int8_t *b0,
                                int64_t ldb, int64_t k0, int64_t k1, int32_t *c0, int32_t *c1,
                                int accumulate, const int8_t *next) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;
    __m256i s00 = _mm256_setzero_si256(), s01 = s00, s02 = s00, s03 = s00;
    __m256i s10 = s00, s11 = s00, s12 = s00, s13 = s00;
    int64_t kv = k0 + (k1 - k0) / 32 * 32;
    for (int64_t k = k0; k < kv; k += 32) {
        prefetch_rows4(next, ldb, k);
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(b0 + k));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(b1 + k));
        __m256i w2 = _mm256_loadu_si256((const __m256i *)(b2 + k));
        __m256i w3 = _mm256_loadu_si256((const __m256i *)(b3 + k));
        __m256i x = _mm256_loadu_si256((const __m256i *)(a0 + k));
        __m256i ax = _mm256_abs_epi8(x);
        s00 = madd_s8(s00, ax, x, w0, ones);
        s01 = madd_s8(s01, ax, x, w1, ones);
        s02 = madd_s8(s02, ax, x, w2, ones);
        s03 = madd_s8(s03, ax, x, w3, ones);
        if (a1) {
            x = _mm256_loadu_si256((const __m256i *)(a1 + k));
            ax = _mm256_abs_epi8(x);
            s10 = madd_s8(s10, ax, x, w0, ones);
            s11 = madd_s8(s11, ax, x, w1, ones);
            s12 = madd_s8(s12, ax, x, w2, ones);
            s13 = madd_s8(s13, ax, x, w3, ones);
        }
    }
    __m128i r0 = hsum4_epi32(s00, s01, s02, s03);
    int32_t t0[4];
    _mm_storeu_si128((__m128i *)t0, r0);
    const int8_t *bs[4] = {b0, b1, b2, b3};
    for (int q = 0; q < 4; q++) {
        int32_t v = t0[q] + dot_s8_tail(a0, bs[q], kv, k1);
        c0[q] = accumulate ? c0[q] + v : v;
    }
    if (a1) {
        __m128i r1 = hsum4_epi32(s10, s11, s12, s13);
        int32_t t1[4];
        _mm_storeu_si128((__m128i *)t1, r1);
        for (int q = 0; q < 4; q++) {
            int32_t v = t1[q] + dot_s8_tail(a1, bs[q], kv, k1);
            c1[q] = accumulate ? c1[q] + v : v;
        }
    }
}

AVX2 static void gemm_avx2_block(int64_t M, int64_t j0, int64_t j1, int64_t K, const int8_t *A,
                                 int64_t lda, const int8_t *B, int64_t ldb, int32_t *C,
                                 int64_t ldc, int64_t N) {
    int64_t j4 = j0 + (j1 - j0) / 4 * 4;
    for (int64_t k0 = 0; k0 < K; k0 += K_BLOCK) {
        int64_t k1 = k0 + K_BLOCK < K ? k0 + K_BLOCK : K;
        for (int64_t i0 = 0; i0 < M; i0 += M_BLOCK) {       /* these rows of A stay in cache */
            int64_t i1 = i0 + M_BLOCK < M ? i0 + M_BLOCK : M;
            for (int64_t j = j0; j < j4; j += 4) {
                for (int64_t i = i0; i < i1; i += 2) {
                    const int8_t *a1 = i + 1 < i1 ? A + (i + 1) * lda : NULL;
                    const int8_t *next = i == i0 && j + 8 <= N ? B + (j + 4) * ldb : NULL;
                    gemm_avx2_tile(A + i * lda, a1, B + j * ldb, ldb, k0, k1, C + i * ldc + j,
                                   a1 ? C + (i + 1) * ldc + j : NULL, k0 > 0, next);
                }
            }
        }
    }
    if (j4 < j1) gemm_generic_block(M, j4, j1, K, A, lda, B, ldb, C, ldc);
}

/* The eight float lanes of v reduced as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). */
AVX2 static inline float hsum8_ps(__m256 v) {
    float l[8];
    _mm256_storeu_ps(l, v);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

AVX2 static inline __m256 widen8(const int8_t *w) {
    __m128i b = _mm_loadl_epi64((const __m128i *)w);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

/* a0q += x0[k..k+7] * fq and, when x1 is not NULL, a1q += x1[k..k+7] * fq (one FMA each). */
AVX2 static inline __attribute__((always_inline)) void fma_4x2(
        const float *x0, const float *x1, int64_t k, __m256 f0, __m256 f1, __m256 f2, __m256 f3,
        __m256 *a00, __m256 *a01, __m256 *a02, __m256 *a03, __m256 *a10, __m256 *a11,
        __m256 *a12, __m256 *a13) {
    __m256 x = _mm256_loadu_ps(x0 + k);
    *a00 = _mm256_fmadd_ps(x, f0, *a00);
    *a01 = _mm256_fmadd_ps(x, f1, *a01);
    *a02 = _mm256_fmadd_ps(x, f2, *a02);
    *a03 = _mm256_fmadd_ps(x, f3, *a03);
    if (x1) {
        x = _mm256_loadu_ps(x1 + k);
        *a10 = _mm256_fmadd_ps(x, f0, *a10);
        *a11 = _mm256_fmadd_ps(x, f1, *a11);
        *a12 = _mm256_fmadd_ps(x, f2, *a12);
        *a13 = _mm256_fmadd_ps(x, f3, *a13);
    }
}

static inline float dot_w8_tail(const float *x, const int8_t *w, int64_t k0, int64_t K, float s) {
    for (int64_t k = k0; k < K; k++) s = fmaf(x[k], (float)w[k], s);
    return s;
}

/* Y[i][j0..j0+3] for rows i and i + 1 (x1 may be NULL): dot_w8 of each pair, then scale, bias;
 * `next`: the next four weight rows (prefetch_rows4) or NULL. */
AVX2 static void w8_avx2_tile(const float *x0, const float *x1, const int8_t *w0, int64_t ldw,
                              int64_t K, const float *scale, const float *bias, float *y0,
                              float *y1, const int8_t *next) {
    const int8_t *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
    __m256 s00 = _mm256_setzero_ps(), s01 = s00, s02 = s00, s03 = s00;
    __m256 s10 = s00, s11 = s00, s12 = s00, s13 = s00;
    int64_t k8 = K - K % 8;
    for (int64_t k = 0; k < k8; k += 8) {
        prefetch_rows4(next, ldw, k);
        fma_4x2(x0, x1, k, widen8(w0 + k), widen8(w1 + k), widen8(w2 + k), widen8(w3 + k),
                &s00, &s01, &s02, &s03, &s10, &s11, &s12, &s13);
    }
    const int8_t *ws[4] = {w0, w1, w2, w3};
    __m256 r0[4] = {s00, s01, s02, s03}, r1[4] = {s10, s11, s12, s13};
    for (int q = 0; q < 4; q++) {
        float d = dot_w8_tail(x0, ws[q], k8, K, hsum8_ps(r0[q]));
        float y = d * scale[q];
        y0[q] = bias ? y + bias[q] : y;
        if (x1) {
            d = dot_w8_tail(x1, ws[q], k8, K, hsum8_ps(r1[q]));
            y = d * scale[q];
            y1[q] = bias ? y + bias[q] : y;
        }
    }
}

/* The "chain" order for rows j0..j1 (j1 - j0 <= N_BLOCK) of W and every row of X. `panel` holds
 * W8_KC x N_BLOCK float32 (32-byte aligned), `sums` M x N_BLOCK float32 (partial chains between
 * k-panels). */
AVX2 static void w8_avx2_chain_block(int64_t M, int64_t j0, int64_t j1, int64_t K, const float *X,
                                     int64_t ldx, const int8_t *W, int64_t ldw, const float *scale,
                                     const float *bias, float *Y, int64_t ldy, float *panel,
                                     float *sums) {
    int64_t nc = j1 - j0;
    for (int64_t i = 0; i < M * N_BLOCK; i++) sums[i] = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += W8_KC) {
        int64_t kc = k0 + W8_KC < K ? W8_KC : K - k0;
        for (int64_t c = 0; c < N_BLOCK; c++) {
            const int8_t *w = W + (j0 + c) * ldw + k0;
            if (c < nc)
                for (int64_t k = 0; k < kc; k++) panel[k * N_BLOCK + c] = (float)w[k];
            else
                for (int64_t k = 0; k < kc; k++) panel[k * N_BLOCK + c] = 0.0f;
        }
        for (int64_t i = 0; i < M; i += W8_MR) {
            const float *x[W8_MR];
#pragma GCC unroll 6
            for (int r = 0; r < W8_MR; r++)     /* rows past M repeat row i; never stored */
                x[r] = X + (i + r < M ? i + r : i) * ldx + k0;
            float *t = sums + i * N_BLOCK;
            int rows = M - i < W8_MR ? (int)(M - i) : W8_MR;
            __m256 a[W8_MR][2];
#pragma GCC unroll 6
            for (int r = 0; r < W8_MR; r++) {
                const float *src = t + (r < rows ? r : 0) * N_BLOCK;
                a[r][0] = _mm256_loadu_ps(src);
                a[r][1] = _mm256_loadu_ps(src + 8);
            }
            for (int64_t k = 0; k < kc; k++) {
                __m256 w0 = _mm256_load_ps(panel + k * N_BLOCK);
                __m256 w1 = _mm256_load_ps(panel + k * N_BLOCK + 8);
#pragma GCC unroll 6
                for (int r = 0; r < W8_MR; r++) {
                    __m256 b = _mm256_broadcast_ss(x[r] + k);
                    a[r][0] = _mm256_fmadd_ps(b, w0, a[r][0]);
                    a[r][1] = _mm256_fmadd_ps(b, w1, a[r][1]);
                }
            }
            float tile[W8_MR * N_BLOCK];     /* constant indices keep a[][] in registers */
#pragma GCC unroll 6
            for (int r = 0; r < W8_MR; r++) {
                _mm256_storeu_ps(tile + r * N_BLOCK, a[r][0]);
                _mm256_storeu_ps(tile + r * N_BLOCK + 8, a[r][1]);
            }
            for (int64_t e = 0; e < rows * N_BLOCK; e++) t[e] = tile[e];
        }
    }
    for (int64_t i = 0; i < M; i++)
        for (int64_t c = 0; c < nc; c++) {
            float y = sums[i * N_BLOCK + c] * scale[j0 + c];
            Y[i * ldy + j0 + c] = bias ? y + bias[j0 + c] : y;
        }
}

/* Rows j0..j1 of W (of N) against every row of X; the first pair of X rows over each group of four
 * weight rows prefetches the next group, past j1 too (the next block is usually this thread's). */
AVX2 static void w8_avx2_block(int64_t M, int64_t j0, int64_t j1, int64_t K, const float *X,
                               int64_t ldx, const int8_t *W, int64_t ldw, const float *scale,
                               const float *bias, float *Y, int64_t ldy, int64_t N) {
    int64_t j4 = j0 + (j1 - j0) / 4 * 4;
    for (int64_t j = j0; j < j4; j += 4)
        for (int64_t i = 0; i < M; i += 2) {
            const float *x1 = i + 1 < M ? X + (i + 1) * ldx : NULL;
            const int8_t *next = i == 0 && j + 8 <= N ? W + (j + 4) * ldw : NULL;
            w8_avx2_tile(X + i * ldx, x1, W + j * ldw, ldw, K, scale + j,
                         bias ? bias + j : NULL, Y + i * ldy + j,
                         x1 ? Y + (i + 1) * ldy + j : NULL, next);
        }
    if (j4 < j1) w8_generic_block(M, j4, j1, K, X, ldx, W, ldw, scale, bias, Y, ldy);
}

/* Y[i][j0..j0+3] for rows i and i + 1 (x1 may be NULL) of the block-scaled product. */
AVX2 static void w8b_avx2_tile(const float *x0, const float *x1, const int8_t *w0, int64_t ldw,
                               const float *s0, int64_t groups, int64_t block,
                               const float *bias, float *y0, float *y1, const int8_t *next) {
    const int8_t *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
    const float *s1 = s0 + groups, *s2 = s1 + groups, *s3 = s2 + groups;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (int64_t g = 0; g < groups; g++) {
        __m256 c0 = _mm256_set1_ps(s0[g]), c1 = _mm256_set1_ps(s1[g]);
        __m256 c2 = _mm256_set1_ps(s2[g]), c3 = _mm256_set1_ps(s3[g]);
        for (int64_t k = g * block; k < (g + 1) * block; k += 8) {
            prefetch_rows4(next, ldw, k);
            fma_4x2(x0, x1, k, _mm256_mul_ps(widen8(w0 + k), c0),
                    _mm256_mul_ps(widen8(w1 + k), c1), _mm256_mul_ps(widen8(w2 + k), c2),
                    _mm256_mul_ps(widen8(w3 + k), c3), &a00, &a01, &a02, &a03, &a10, &a11, &a12,
                    &a13);
        }
    }
    __m256 r0[4] = {a00, a01, a02, a03}, r1[4] = {a10, a11, a12, a13};
    for (int q = 0; q < 4; q++) {
        float d = hsum8_ps(r0[q]);
        y0[q] = bias ? d + bias[q] : d;
        if (x1) {
            d = hsum8_ps(r1[q]);
            y1[q] = bias ? d + bias[q] : d;
        }
    }
}

AVX2 static void w8b_avx2_block(int64_t M, int64_t j0, int64_t j1, int64_t K, const float *X,
                                int64_t ldx, const int8_t *W, int64_t ldw, const float *S,
                                int64_t block, const float *bias, float *Y, int64_t ldy,
                                int64_t N) {
    int64_t groups = K / block, j4 = j0 + (j1 - j0) / 4 * 4;
    for (int64_t j = j0; j < j4; j += 4)
        for (int64_t i = 0; i < M; i += 2) {
            const float *x1 = i + 1 < M ? X + (i + 1) * ldx : NULL;
            const int8_t *next = i == 0 && j + 8 <= N ? W + (j + 4) * ldw : NULL;
            w8b_avx2_tile(X + i * ldx, x1, W + j * ldw, ldw, S + j * groups, groups, block,
                          bias ? bias + j : NULL, Y + i * ldy + j,
                          x1 ? Y + (i + 1) * ldy + j : NULL, next);
        }
    if (j4 < j1) w8b_generic_block(M, j4, j1, K, X, ldx, W, ldw, S, block, bias, Y, ldy);
}

/* ------------------------------------------------------------------------------- VNNI */

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))

/* 128 * sum_k B[q][k] for q < 4, k in [0, K) (modulo 2^32): the correction of the a + 128 sums. */
VNNI INLINE void vnni_offsets(const int8_t *b0, int64_t ldb, int64_t K, uint32_t offset[4]) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i bsum[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) bsum[q] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64)
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++)
            bsum[q] = _mm512_dpbusd_epi32(
                bsum[q], ones, _mm512_loadu_si512((const void *)(b0 + q * ldb + k)));
    if (k < K) {
        __mmask64 m = (__mmask64)((~0ULL) >> (64 - (K - k)));
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++)
            bsum[q] = _mm512_dpbusd_epi32(
                bsum[q], ones, _mm512_maskz_loadu_epi8(m, (const void *)(b0 + q * ldb + k)));
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) offset[q] = 128u * (uint32_t)_mm512_reduce_add_epi32(bsum[q]);
}

/* The two 256-bit halves of a added lane by lane. */
VNNI INLINE __m256i vnni_halves(__m512i a) {
    return _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
}

/* The four int32 lane sums of a0..a3 (modulo 2^32), as one vector: halves added, then pairwise
 * horizontal adds (13 instructions instead of four full reductions of 9). */
VNNI INLINE __m128i vnni_sum4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    const __m256i s0 = vnni_halves(a0), s1 = vnni_halves(a1);
    const __m256i s2 = vnni_halves(a2), s3 = vnni_halves(a3);
    /* per 128-bit half: [sum of s0's four, s1's, s2's, s3's] */
    const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
    return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

/* C[r][q] = sum_k A[r][k] B[q][k] for r < ROWS, q < 4, k in [0, K), from ap = A XOR 0x80 (the
 * unsigned a + 128) and the signed weight rows: sum_k ap[k] b[k] - offset[q] (header). `next`,
 * when not NULL, is the next group of four weight rows (same stride): each step of k prefetches
 * the bytes at that k of its rows pf0 .. pf1 - 1 into L2, so the group streams in while this one
 * computes. Into L2, not L1: the next group (4 K bytes) beside this one and the activation rows
 * would overflow a 32 KiB L1 and evict the bytes being multiplied. */
VNNI INLINE void vnni_tile(const int ROWS, const uint8_t *ap, int64_t lda, const int8_t *b0,
                           int64_t ldb, int64_t K, const __m128i offset, int32_t *c, int64_t ldc,
                           const int8_t *next, int pf0, int pf1) {
    __m512i acc[4][4], w[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++)
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) acc[r][q] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        if (next)
#pragma GCC unroll 4
            for (int q = pf0; q < pf1; q++)
                _mm_prefetch((const char *)(next + q * ldb + k), _MM_HINT_T1);
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) w[q] = _mm512_loadu_si512((const void *)(b0 + q * ldb + k));
#pragma GCC unroll 6
        for (int r = 0; r < ROWS; r++) {
            __m512i x = _mm512_loadu_si512((const void *)(ap + r * lda + k));
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) acc[r][q] = _mm512_dpbusd_epi32(acc[r][q], x, w[q]);
        }
    }
    if (k < K) {                       /* masked bytes load as 0: b = 0 adds nothing */
        __mmask64 m = (__mmask64)((~0ULL) >> (64 - (K - k)));
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++)
            w[q] = _mm512_maskz_loadu_epi8(m, (const void *)(b0 + q * ldb + k));
#pragma GCC unroll 6
        for (int r = 0; r < ROWS; r++) {
            __m512i x = _mm512_maskz_loadu_epi8(m, (const void *)(ap + r * lda + k));
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) acc[r][q] = _mm512_dpbusd_epi32(acc[r][q], x, w[q]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
        _mm_storeu_si128((__m128i *)(c + r * ldc),
                         _mm_sub_epi32(vnni_sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]),
                                       offset));
}

/* The first of the next group's four weight rows that tile t of a group prefetches (tile t takes
 * rows [vnni_prefetch_row(t, tp), vnni_prefetch_row(t + 1, tp)); the first tp tiles share all
 * four, later tiles none). */
static inline int vnni_prefetch_row(int t, int tp) { return t < tp ? t * 4 / tp : 4; }

/* C[i][j] for i < M, j in [j0, j1): ap is A XOR 0x80 with row stride lda (A itself is needed only
 * for the columns past the last group of four), row stride ldap. Each group of four weight rows
 * stays in L1 while every row of A passes over it; the group's first (up to) four tiles prefetch
 * the next group, a share of its rows each, so its reads spread over the group's arithmetic.
 * bsum: the rows' sums (indexed like B's rows), or NULL to compute them here. */
VNNI static void gemm_vnni_block(int64_t M, int64_t j0, int64_t j1, int64_t K, const int8_t *A,
                                 int64_t lda, const uint8_t *ap, int64_t ldap, const int8_t *B,
                                 int64_t ldb, const int32_t *bsum, int32_t *C, int64_t ldc) {
    int64_t j4 = j0 + (j1 - j0) / 4 * 4;
    for (int64_t j = j0; j < j4; j += 4) {
        const int8_t *b = B + j * ldb;
        const int8_t *next = j + 8 <= j4 ? b + 4 * ldb : NULL;
        uint32_t offset[4];
        if (bsum) {
            for (int q = 0; q < 4; q++) offset[q] = 128u * (uint32_t)bsum[j + q];
        } else {
            vnni_offsets(b, ldb, K, offset);  /* once per group, for every row of A */
        }
        const __m128i off = _mm_loadu_si128((const __m128i *)offset);
        int64_t i = 0;
        int tiles = (int)(M / 4 + (M % 4 >= 2) + (M % 2)), tp = tiles < 4 ? tiles : 4, t = 0;
#define PF(t) vnni_prefetch_row(t, tp), vnni_prefetch_row((t) + 1, tp)
        for (; i + 4 <= M; i += 4, t++)
            vnni_tile(4, ap + i * ldap, ldap, b, ldb, K, off, C + i * ldc + j, ldc, next, PF(t));
        if (M - i >= 2) {
            vnni_tile(2, ap + i * ldap, ldap, b, ldb, K, off, C + i * ldc + j, ldc, next, PF(t));
            t++;
            i += 2;
        }
        if (i < M)
            vnni_tile(1, ap + i * ldap, ldap, b, ldb, K, off, C + i * ldc + j, ldc, next, PF(t));
#undef PF
    }
    if (j4 < j1) gemm_generic_block(M, j4, j1, K, A, lda, B, ldb, C, ldc);
}

/* The weight-only "lanes" order (header comment) with AVX-512: a vector holds the eight lane sums
 * of two weight rows (lanes 0-7 row q, lanes 8-15 row q + 1), and every lane runs the same chain
 * of fused multiply-adds as in the AVX2 kernel, so the bits are the same. A tile is four weight
 * rows by ROWS rows of X: each weight byte is converted once per tile, not once per pair of
 * rows. */
VNNI INLINE __m512 w8_widen16(const int8_t *w0, const int8_t *w1) {
    __m128i b = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)w0),
                                   _mm_loadl_epi64((const __m128i *)w1));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

/* x[0..7] in both halves of a vector. */
VNNI INLINE __m512 w8_twice8(const float *x) {
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(x))));
}

/* Y[r][0..3] for r < ROWS: rows X + r ldx against weight rows w0 .. w0 + 3 ldw, then scale and
 * bias. `next`: the next four weight rows, prefetched into L2 a line per row per 64 k, or NULL. */
VNNI INLINE void w8_avx512_tile(const int ROWS, const float *X, int64_t ldx, const int8_t *w0,
                                int64_t ldw, int64_t K, const float *scale, const float *bias,
                                float *Y, int64_t ldy, const int8_t *next) {
    const int8_t *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
    __m512 acc[6][2];
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t k8 = K - K % 8;
    for (int64_t k = 0; k < k8; k += 8) {
        if (next && (k & 63) == 0)
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++)
                _mm_prefetch((const char *)(next + q * ldw + k), _MM_HINT_T1);
        const __m512 f01 = w8_widen16(w0 + k, w1 + k), f23 = w8_widen16(w2 + k, w3 + k);
#pragma GCC unroll 6
        for (int r = 0; r < ROWS; r++) {
            const __m512 x = w8_twice8(X + r * ldx + k);
            acc[r][0] = _mm512_fmadd_ps(x, f01, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(x, f23, acc[r][1]);
        }
    }
    const int8_t *ws[4] = {w0, w1, w2, w3};
    for (int r = 0; r < ROWS; r++) {
        float l[32];
        _mm512_storeu_ps(l, acc[r][0]);
        _mm512_storeu_ps(l + 16, acc[r][1]);
        for (int q = 0; q < 4; q++) {
            const float *a = l + 8 * q;
            float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
            float y = dot_w8_tail(X + r * ldx, ws[q], k8, K, s) * scale[q];
            Y[r * ldy + q] = bias ? y + bias[q] : y;
        }
    }
}

/* Rows j0..j1 of W (of N) against every row of X (M < QK_W8_PACKED_MIN_ROWS), six rows of X per
 * tile; the first tile over each group of four weight rows prefetches the next group, past j1
 * too. The rows of W past the last group of four take the portable kernel (the same order). */
VNNI static void w8_avx512_block(int64_t M, int64_t j0, int64_t j1, int64_t K, const float *X,
                                 int64_t ldx, const int8_t *W, int64_t ldw, const float *scale,
                                 const float *bias, float *Y, int64_t ldy, int64_t N) {
    int64_t j4 = j0 + (j1 - j0) / 4 * 4;
    for (int64_t j = j0; j < j4; j += 4) {
        const int8_t *next = j + 8 <= N ? W + (j + 4) * ldw : NULL, *w = W + j * ldw;
        const float *b = bias ? bias + j : NULL;
        int64_t i = 0;
#define W8_TILE(R) w8_avx512_tile(R, X + i * ldx, ldx, w, ldw, K, scale + j, b, Y + i * ldy + j, \
                                  ldy, next)
        for (; i + 6 <= M; i += 6, next = NULL) W8_TILE(6);
        switch (M - i) {          /* a constant row count, so each tile keeps its registers */
        case 5: W8_TILE(5); break;
        case 4: W8_TILE(4); break;
        case 3: W8_TILE(3); break;
        case 2: W8_TILE(2); break;
        case 1: W8_TILE(1); break;
        default: break;
        }
#undef W8_TILE
    }
    if (j4 < j1) w8_generic_block(M, j4, j1, K, X, ldx, W, ldw, scale, bias, Y, ldy);
}

/* Block-scaled W8A8 on VNNI (blocks a multiple of 4 long): the weight is packed per work item of
 * 32 weight rows so that one vector holds sixteen weight rows' four codes at one k group (row kg
 * of the packing: the bytes k = 4 kg .. 4 kg + 3 of weight rows 0-15, then of rows 16-31); an
 * activation row's four codes (a + 128) broadcast against it give sixteen outputs' lane sums at
 * once, with no horizontal reduction. Per block g: C_g = sum_k (a + 128) b - 128 sum_k b (the
 * block's weight sums taken from the packing), then t = t + float32(C_g) * S[j][g]; finally
 * y = t * sx[i] + bias[j], each float32 operation rounded once, as in the other kernels. */
#define VB_COLS 32      /* weight rows per work item: two vectors of sixteen outputs */
#define VB_ROWS 6       /* activation rows per tile */

/* Weight rows [0, nj) of W (row stride ldw), nj <= 32, in groups of four k, the layout both the
 * packed VNNI and the AMX kernels read: row kg of Wp (128 bytes) holds the codes k = 4 kg ..
 * 4 kg + 3 of weight rows 0-15, then of rows 16-31, for kg < kgs (zeros past K and past row
 * nj - 1). Sixteen full rows' group within K is one AVX-512 gather; edges go byte by byte. */
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void pack_weight_groups(const int8_t *W, int64_t ldw, int64_t nj, int64_t K, int64_t kgs,
                               int8_t *Wp) {
    const int gather = ldw <= INT32_MAX / 16;
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)(gather ? ldw : 0)));
    for (int h = 0; h < 2; h++) {
        int64_t c0 = 16 * h;
        for (int64_t kg = 0; kg < kgs; kg++) {
            int8_t *dst = Wp + kg * 128 + 64 * h;
            if (gather && c0 + 16 <= nj && 4 * kg + 4 <= K) {
                _mm512_storeu_si512((void *)dst, _mm512_i32gather_epi32(
                    rows, (const void *)(W + c0 * ldw + 4 * kg), 1));
                continue;
            }
            for (int c = 0; c < 16; c++)
                for (int q = 0; q < 4; q++) {
                    int64_t k = 4 * kg + q;
                    dst[4 * c + q] = c0 + c < nj && k < K ? W[(c0 + c) * ldw + k] : 0;
                }
        }
    }
}

/* Weight rows [0, nj) of B (row stride ldb), nj <= VB_COLS, packed into Wp (pack_weight_groups,
 * K / 4 groups), each block's weight row sums into bsum[g][jj] and the scales transposed into
 * Sp[g][jj] (S[jj][g]; zeros past nj). */
VNNI static void vb_pack(const int8_t *B, int64_t ldb, int64_t nj, int64_t K, int64_t block,
                         const float *S, int64_t groups, int8_t *Wp, int32_t *bsum, float *Sp) {
    pack_weight_groups(B, ldb, nj, K, K / 4, Wp);
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t g = 0; g < groups; g++) {
        __m512i s0 = _mm512_setzero_si512(), s1 = s0;
        for (int64_t kg = g * block / 4; kg < (g + 1) * block / 4; kg++) {
            s0 = _mm512_dpbusd_epi32(s0, ones, _mm512_loadu_si512((const void *)(Wp + kg * 128)));
            s1 = _mm512_dpbusd_epi32(s1, ones,
                                     _mm512_loadu_si512((const void *)(Wp + kg * 128 + 64)));
        }
        _mm512_storeu_si512((void *)(bsum + g * VB_COLS), s0);
        _mm512_storeu_si512((void *)(bsum + g * VB_COLS + 16), s1);
        for (int64_t jj = 0; jj < VB_COLS; jj++)
            Sp[g * VB_COLS + jj] = jj < nj ? S[jj * groups + g] : 0.0f;
    }
}

/* Y[r][0 .. nj - 1] for the ROWS activation rows ap + r ldap (a + 128) against a packed item. */
VNNI INLINE void vb_tile(const int ROWS, const uint8_t *ap, int64_t ldap, const int8_t *Wp,
                         const int32_t *bsum, const float *Sp, int64_t groups, int64_t block,
                         const float *sx, const float *bias, int64_t nj, float *Y, int64_t ldy) {
    __m512 t[VB_ROWS][2];
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; r++) t[r][0] = t[r][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i acc[VB_ROWS][2];
#pragma GCC unroll 6
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
        for (int64_t kg = g * block / 4; kg < (g + 1) * block / 4; kg++) {
            const __m512i w0 = _mm512_loadu_si512((const void *)(Wp + kg * 128));
            const __m512i w1 = _mm512_loadu_si512((const void *)(Wp + kg * 128 + 64));
#pragma GCC unroll 6
            for (int r = 0; r < ROWS; r++) {
                int32_t four;
                memcpy(&four, ap + r * ldap + 4 * kg, 4);
                const __m512i x = _mm512_set1_epi32(four);
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], x, w0);
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], x, w1);
            }
        }
        const int32_t *bs = bsum + g * VB_COLS;
        const __m512i off0 = _mm512_slli_epi32(_mm512_loadu_si512((const void *)bs), 7);
        const __m512i off1 = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(bs + 16)), 7);
        const __m512 s0 = _mm512_loadu_ps(Sp + g * VB_COLS);
        const __m512 s1 = _mm512_loadu_ps(Sp + g * VB_COLS + 16);
#pragma GCC unroll 6
        for (int r = 0; r < ROWS; r++) {
            const __m512 c0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][0], off0));
            const __m512 c1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][1], off1));
            t[r][0] = _mm512_add_ps(t[r][0], _mm512_mul_ps(c0, s0));
            t[r][1] = _mm512_add_ps(t[r][1], _mm512_mul_ps(c1, s1));
        }
    }
    for (int h = 0; h * 16 < nj; h++) {
        int64_t nc = nj - 16 * h < 16 ? nj - 16 * h : 16;
        __mmask16 m = (__mmask16)((1u << nc) - 1u);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + 16 * h) : _mm512_setzero_ps();
        for (int r = 0; r < ROWS; r++) {
            __m512 y = _mm512_mul_ps(t[r][h], _mm512_set1_ps(sx[r]));
            if (bias) y = _mm512_add_ps(y, b);
            _mm512_mask_storeu_ps(Y + r * ldy + 16 * h, m, y);
        }
    }
}

/* The outputs of weight rows [j0, j0 + nj) for every row of ap, from their packing. A function
 * of its own (not the body of vb_product's OpenMP region): compilers outline that region without
 * the AVX-512 target, and the always-inlined tiles must land in a function that has it. */
VNNI static void vb_item(int64_t M, int64_t K, const uint8_t *ap, const int8_t *Wp,
                         const int32_t *bsum, const float *Sp, int64_t groups, int64_t block,
                         const float *sx, const float *b, int64_t j0, int64_t nj, float *Y,
                         int64_t ldy) {
    int64_t i = 0;
#define VB_TILE(R) vb_tile(R, ap + i * K, K, Wp, bsum, Sp, groups, block, sx + i, b, nj, \
                           Y + i * ldy + j0, ldy)
    for (; i + VB_ROWS <= M; i += VB_ROWS) VB_TILE(VB_ROWS);
    switch (M - i) {              /* a constant row count, so each tile keeps its registers */
    case 5: VB_TILE(5); break;
    case 4: VB_TILE(4); break;
    case 3: VB_TILE(3); break;
    case 2: VB_TILE(2); break;
    case 1: VB_TILE(1); break;
    default: break;
    }
#undef VB_TILE
}

/* qk_cpu_linear_w8a8b_f32 on VNNI with blocks a multiple of 4 long (K > 0): work items of
 * VB_COLS weight rows shared among the threads, each packed once and passed over by every row
 * of ap (A + 128, row stride K). */
VNNI static int vb_product(int64_t M, int64_t N, int64_t K, const uint8_t *ap, const int8_t *B,
                           int64_t ldb, const float *sx, const float *S, int64_t block,
                           const float *bias, float *Y, int64_t ldy, int threads) {
    const int64_t items = (N + VB_COLS - 1) / VB_COLS, groups = K / block;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (threads > 1 && items > 1) reduction(| : failed)
    {
        int8_t *Wp = malloc((size_t)(K / 4 * 128));
        int32_t *bsum = malloc(sizeof(int32_t) * (size_t)(groups * VB_COLS));
        float *Sp = malloc(sizeof(float) * (size_t)(groups * VB_COLS));
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (!Wp || !bsum || !Sp) {
                failed = 1;
                continue;
            }
            int64_t j0 = item * VB_COLS, nj = N - j0 < VB_COLS ? N - j0 : VB_COLS;
            vb_pack(B + j0 * ldb, ldb, nj, K, block, S + j0 * groups, groups, Wp, bsum, Sp);
            vb_item(M, K, ap, Wp, bsum, Sp, groups, block, sx, bias ? bias + j0 : NULL, j0, nj, Y,
                    ldy);
        }
        free(Wp);
        free(bsum);
        free(Sp);
    }
    return failed ? QK_ERR_MEMORY : QK_OK;
}
#endif

/* -------------------------------------------------------------------------------- AMX */

/* AMX (Intel Sapphire Rapids and later): tdpbssd multiplies signed by signed bytes, so the codes
 * need no offset. Tile registers of 16 rows x 64 bytes; a product tile is
 *   T[r][c] += sum_{k < 16, q < 4} S1[r][4k + q] * S2[k][4c + q]   (int32, wrapping)
 * S1 is a tile of activation rows as they are (16 rows i, 64 consecutive k each), copied into
 * contiguous tiles (amx_pack_rows); S2 holds sixteen weight rows in the layout of
 * pack_weight_groups, shared with the packed VNNI kernel: row r of weight tile (t, kc), 128 bytes
 * after row r - 1, holds the four codes k = 64 kc + 4r .. 64 kc + 4r + 3 of each of the weight
 * rows 16 t .. 16 t + 15. Zeros past M, N and K. The product tile is
 * then C itself: T[i][j] = sum_k A[i][k] B[j][k], summed over k in another order than the other
 * paths, which changes no bit: every path computes the exact integer (modulo 2^32). */
#ifdef QK_HAVE_AMX
#define AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
/* Rows per tile (activation rows of S1, weight rows of S2). */
#define AMX_ROWS 16
/* Bytes of k per tile row of S1; one tile is AMX_ROWS * AMX_K bytes. */
#define AMX_K 64
#define AMX_TILE_BYTES (AMX_ROWS * AMX_K)
/* Bytes between a weight tile's rows in the packed weight (pack_weight_groups: two tiles' rows
 * interleaved). */
#define AMX_W_STRIDE 128
/* Weight rows per work item: two weight tiles. */
#define AMX_N_BLOCK 32
/* Bytes of packed activations per pass over the weight, sized to stay in L2 while every work item
 * of the pass reads them. */
#define AMX_PASS_BYTES (1 << 20)
/* The tile loads and stores are asm statements that do not tell the compiler they touch memory:
 * a compiler barrier keeps the stores that fill a buffer before the tile loads that read it, and
 * the reads of a tile store's buffer after it. */
#define AMX_MEMORY_BARRIER() __asm__ volatile("" ::: "memory")

/* 1 when the CPU has AMX-TILE and AMX-INT8, the OS saves tile state, and Linux grants this process
 * the tile data (asked once; the grant holds for every thread of the process). */
static int amx_usable(void) {
    static int state = -1;
    int s = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
    if (s >= 0) return s;
    unsigned a, b, c, d;
    int ok = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 24)) && (d & (1u << 25))
        && __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 27))) {          /* OSXSAVE */
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if ((lo & (3u << 17)) == (3u << 17))                     /* XTILECFG and XTILEDATA */
            ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    __atomic_store_n(&state, ok, __ATOMIC_RELEASE);
    return ok;
}

/* Every tile register 16 rows x 64 bytes (palette 1), for the calling thread. */
AMX static void amx_configure(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((aligned(64))) cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = AMX_K;
        cfg.rows[t] = AMX_ROWS;
    }
    AMX_MEMORY_BARRIER();
    _tile_loadconfig(&cfg);
}

/* The calling thread's tile state released (a function of its own: an OpenMP region's body is
 * outlined without the AMX target). */
AMX static void amx_release(void) { _tile_release(); }

/* Activation tile (b, kc) of A (M, K): rows 16 b .. 16 b + 15, bytes 64 kc .. 64 kc + 63 of each,
 * zeros past M and K, into P (16 rows of 64 bytes). Contiguous tiles: rows a power of two apart in
 * memory would put a tile's sixteen lines into one L1 set. */
AMX static void amx_pack_rows(int64_t M, int64_t K, const int8_t *A, int64_t lda, int64_t b,
                              int64_t kc, int8_t *P) {
    int64_t k0 = kc * AMX_K, len = K - k0 < AMX_K ? K - k0 : AMX_K;
    __mmask64 m = (__mmask64)((~0ULL) >> (AMX_K - len));
    for (int64_t r = 0; r < AMX_ROWS; r++) {
        int64_t i = b * AMX_ROWS + r;
        __m512i v = i < M ? _mm512_maskz_loadu_epi8(m, (const void *)(A + i * lda + k0))
                          : _mm512_setzero_si512();
        _mm512_store_si512((void *)(P + r * AMX_K), v);
    }
}

/* Where a work item's product tiles go: the int32 C (Y NULL), or Y = float32(C) * (sx[i] * sw[j])
 * + bias[j] (S NULL), or, with block scales S[j][g] (N, groups; blocks of `block` k, a multiple of
 * 64), Y = t * sx[i] + bias[j] with t = 0 and, for g = 0, 1, ..., t = t + float32(C_g) * S[j][g]
 * (C_g the product over block g). Each float32 operation rounded once, in that order. */
typedef struct {
    int32_t *C;
    int64_t ldc;
    float *Y;
    int64_t ldy;
    const float *sx, *sw, *bias, *S;
    int64_t groups, block;
} amx_out;

/* Rows i0 .. i0 + mi - 1 of the output at columns j0 .. j0 + nj - 1 from acc[ii][jj] (row stride
 * AMX_N_BLOCK): the product tiles of activation rows i0 + ii and weight rows j0 + jj. Sixteen
 * columns per vector; the int32 to float32 conversion rounds to nearest, as a C cast does. */
AMX static void amx_store(const int32_t *acc, int64_t i0, int64_t mi, int64_t j0, int64_t nj,
                          const amx_out *out) {
    for (int h = 0; h * AMX_ROWS < nj; h++) {
        int64_t c0 = h * AMX_ROWS, nc = nj - c0 < AMX_ROWS ? nj - c0 : AMX_ROWS;
        __mmask16 m = (__mmask16)((1u << nc) - 1u);
        if (!out->Y) {
            for (int64_t ii = 0; ii < mi; ii++)
                _mm512_mask_storeu_epi32((void *)(out->C + (i0 + ii) * out->ldc + j0 + c0), m,
                                         _mm512_loadu_si512((const void *)(acc + ii * AMX_N_BLOCK
                                                                           + c0)));
            continue;
        }
        const __m512 sw = _mm512_maskz_loadu_ps(m, out->sw + j0 + c0);
        const __m512 bias = out->bias ? _mm512_maskz_loadu_ps(m, out->bias + j0 + c0)
                                      : _mm512_setzero_ps();
        for (int64_t ii = 0; ii < mi; ii++) {
            const __m512 s = _mm512_mul_ps(_mm512_set1_ps(out->sx[i0 + ii]), sw);
            __m512 y = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(acc + ii * AMX_N_BLOCK + c0))),
                s);
            if (out->bias) y = _mm512_add_ps(y, bias);
            _mm512_mask_storeu_ps(out->Y + (i0 + ii) * out->ldy + j0 + c0, m, y);
        }
    }
}

/* acc[ii][jj] (row stride AMX_N_BLOCK) = the product over k tiles [kc0, kc1) of the activation
 * tiles P0 (rows 0-15) and P1 (rows 16-31, when two_a) and the weight tiles of Wp (columns 0-15,
 * and 16-31 when two_w). Four product tiles from two activation and two weight tiles per k tile
 * (all eight tile registers); fewer where one side has a single tile. */
AMX INLINE void amx_tiles(const int8_t *P0, const int8_t *P1, const int8_t *Wp, int64_t kc0,
                          int64_t kc1, int two_a, int two_w, int32_t *acc) {
    const int64_t ld_acc = AMX_N_BLOCK * (int64_t)sizeof(int32_t);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    if (two_a && two_w) {
        for (int64_t kc = kc0; kc < kc1; kc++) {
            const int8_t *w = Wp + kc * 2 * AMX_TILE_BYTES;
            _tile_loadd(4, P0 + kc * AMX_TILE_BYTES, AMX_K);
            _tile_loadd(5, P1 + kc * AMX_TILE_BYTES, AMX_K);
            _tile_loadd(6, w, AMX_W_STRIDE);
            _tile_loadd(7, w + AMX_K, AMX_W_STRIDE);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        }
    } else {
        for (int64_t kc = kc0; kc < kc1; kc++) {
            const int8_t *w = Wp + kc * 2 * AMX_TILE_BYTES;
            _tile_loadd(4, P0 + kc * AMX_TILE_BYTES, AMX_K);
            _tile_loadd(6, w, AMX_W_STRIDE);
            _tile_dpbssd(0, 4, 6);
            if (two_w) {
                _tile_loadd(7, w + AMX_K, AMX_W_STRIDE);
                _tile_dpbssd(1, 4, 7);
            }
            if (two_a) {
                _tile_loadd(5, P1 + kc * AMX_TILE_BYTES, AMX_K);
                _tile_dpbssd(2, 5, 6);
            }
        }
    }
    _tile_stored(0, acc, ld_acc);
    _tile_stored(1, acc + AMX_ROWS, ld_acc);
    _tile_stored(2, acc + AMX_ROWS * AMX_N_BLOCK, ld_acc);
    _tile_stored(3, acc + AMX_ROWS * AMX_N_BLOCK + AMX_ROWS, ld_acc);
    AMX_MEMORY_BARRIER();
}

/* The output of weight rows [j0, j0 + nj), nj <= AMX_N_BLOCK, packed in Wp (pack_weight_groups),
 * for activation tiles [b0, b1) of the packed P (kcs tiles of k each), two activation tiles at a
 * time (one last when b1 - b0 is odd). With block scales, Sp holds them for these rows
 * (Sp[g][jj] = S[j0 + jj][g], zeros past nj) and each block's product is rescaled into the float32
 * sums t before the next one. */
AMX static void amx_block(int64_t M, int64_t j0, int64_t nj, int64_t kcs, const int8_t *Wp,
                          const float *Sp, const int8_t *P, int64_t b0, int64_t b1,
                          const amx_out *out) {
    int32_t acc[2 * AMX_ROWS * AMX_N_BLOCK] __attribute__((aligned(64)));
    float t[2 * AMX_ROWS * AMX_N_BLOCK] __attribute__((aligned(64)));
    const int two_w = nj > AMX_ROWS;
    AMX_MEMORY_BARRIER();                       /* Wp and P are written before this call */
    for (int64_t b = b0; b < b1; b += 2) {
        const int two_a = b + 1 < b1;
        const int8_t *P0 = P + b * kcs * AMX_TILE_BYTES, *P1 = P0 + kcs * AMX_TILE_BYTES;
        int64_t i0 = b * AMX_ROWS, mi = M - i0 < 2 * AMX_ROWS ? M - i0 : 2 * AMX_ROWS;
        if (!out->S) {
            amx_tiles(P0, P1, Wp, 0, kcs, two_a, two_w, acc);
            amx_store(acc, i0, mi, j0, nj, out);
            continue;
        }
        const int64_t per = out->block / AMX_K;     /* k tiles per block */
        for (int64_t e = 0; e < 2 * AMX_ROWS * AMX_N_BLOCK; e++) t[e] = 0.0f;
        for (int64_t g = 0; g < out->groups; g++) {
            amx_tiles(P0, P1, Wp, g * per, (g + 1) * per, two_a, two_w, acc);
            for (int h = 0; h < 2; h++) {
                const __m512 sg = _mm512_loadu_ps(Sp + g * AMX_N_BLOCK + h * AMX_ROWS);
                for (int64_t ii = 0; ii < mi; ii++) {
                    int64_t e = ii * AMX_N_BLOCK + h * AMX_ROWS;
                    __m512 c = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(acc + e)));
                    _mm512_store_ps(t + e, _mm512_add_ps(_mm512_load_ps(t + e),
                                                         _mm512_mul_ps(c, sg)));
                }
            }
        }
        for (int h = 0; h * AMX_ROWS < nj; h++) {
            int64_t c0 = h * AMX_ROWS, nc = nj - c0 < AMX_ROWS ? nj - c0 : AMX_ROWS;
            __mmask16 m = (__mmask16)((1u << nc) - 1u);
            const __m512 bias = out->bias ? _mm512_maskz_loadu_ps(m, out->bias + j0 + c0)
                                          : _mm512_setzero_ps();
            for (int64_t ii = 0; ii < mi; ii++) {
                __m512 y = _mm512_mul_ps(_mm512_load_ps(t + ii * AMX_N_BLOCK + c0),
                                      _mm512_set1_ps(out->sx[i0 + ii]));
                if (out->bias) y = _mm512_add_ps(y, bias);
                _mm512_mask_storeu_ps(out->Y + (i0 + ii) * out->ldy + j0 + c0, m, y);
            }
        }
    }
}

/* The AMX product of A (M, K) and B (N, K), K > 0, into `out`. The activations are packed once;
 * then, pass by pass over row ranges of A whose packed bytes stay in L2, the work items (32
 * weight rows each, packed into a panel per item) are shared among the threads. Returns
 * QK_ERR_MEMORY when a buffer cannot be allocated. */
AMX static int amx_product(int64_t M, int64_t N, int64_t K, const int8_t *A, int64_t lda,
                           const int8_t *B, int64_t ldb, const amx_out *out, int threads) {
    const int64_t kcs = (K + AMX_K - 1) / AMX_K, tiles = (M + AMX_ROWS - 1) / AMX_ROWS;
    const int64_t items = (N + AMX_N_BLOCK - 1) / AMX_N_BLOCK;
    int64_t pass = AMX_PASS_BYTES / (kcs * AMX_TILE_BYTES) / 2 * 2;   /* activation tiles */
    if (pass < 2) pass = 2;
    int8_t *P = aligned_alloc(64, (size_t)(tiles * kcs * AMX_TILE_BYTES));
    if (!P) return QK_ERR_MEMORY;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        int8_t *Wp = aligned_alloc(64, (size_t)(kcs * 2 * AMX_TILE_BYTES));
        float *Sp = out->S ? malloc(sizeof(float) * (size_t)(out->groups * AMX_N_BLOCK)) : NULL;
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles * kcs; t++)
            amx_pack_rows(M, K, A, lda, t / kcs, t % kcs, P + t * AMX_TILE_BYTES);
        amx_configure();
        for (int64_t b0 = 0; b0 < tiles; b0 += pass) {
            int64_t b1 = b0 + pass < tiles ? b0 + pass : tiles;
            #pragma omp for schedule(static)
            for (int64_t item = 0; item < items; item++) {
                if (!Wp || (out->S && !Sp)) {
                    failed = 1;
                    continue;
                }
                int64_t j0 = item * AMX_N_BLOCK, nj = N - j0 < AMX_N_BLOCK ? N - j0 : AMX_N_BLOCK;
                pack_weight_groups(B + j0 * ldb, ldb, nj, K, kcs * AMX_K / 4, Wp);
                if (Sp)
                    for (int64_t g = 0; g < out->groups; g++)
                        for (int64_t jj = 0; jj < AMX_N_BLOCK; jj++)
                            Sp[g * AMX_N_BLOCK + jj] = jj < nj ? out->S[(j0 + jj) * out->groups + g]
                                                               : 0.0f;
                amx_block(M, j0, nj, kcs, Wp, Sp, P, b0, b1, out);
            }
        }
        amx_release();
        free(Wp);
        free(Sp);
    }
    free(P);
    return failed ? QK_ERR_MEMORY : QK_OK;
}
#endif

/* A XOR 0x80 (a + 128 as unsigned bytes) with row stride K, for the VNNI path; NULL when out of
 * memory. */
static uint8_t *offset_copy(int64_t M, int64_t K, const int8_t *A, int64_t lda) {
    uint8_t *ap = malloc(M * K > 0 ? (size_t)(M * K) : 1);
    if (!ap) return NULL;
    for (int64_t i = 0; i < M; i++)
        for (int64_t k = 0; k < K; k++) ap[i * K + k] = (uint8_t)A[i * lda + k] ^ 0x80u;
    return ap;
}

/* ------------------------------------------------------------------------ entry points */

static int check_shapes(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
    if (M < 0 || N < 0 || K < 0) return 0;
    if (lda < K || ldb < K || ldc < N) return 0;
    return 1;
}

EXPORT int qk_cpu_gemm_s8s8s32(int path, int64_t M, int64_t N, int64_t K, const int8_t *A,
                               int64_t lda, const int8_t *B, int64_t ldb, const int32_t *bsum,
                               int32_t *C, int64_t ldc, int threads) {
    if (!path_supported(path)) return QK_ERR_UNSUPPORTED;
    if (!check_shapes(M, N, K, lda, ldb, ldc)) return QK_ERR_ARGUMENT;
    if (M == 0 || N == 0) return QK_OK;
    int64_t blocks = (N + INT8_N_BLOCK - 1) / INT8_N_BLOCK;
    if (threads < 1) threads = 1;
#ifdef QK_HAVE_AMX
    if (path == QK_PATH_AMX && K > 0) {
        amx_out out = {C, ldc, NULL, 0, NULL, NULL, NULL, NULL, 0, 0};
        return amx_product(M, N, K, A, lda, B, ldb, &out, threads);
    }
#endif
    uint8_t *ap = NULL;
    if (path == QK_PATH_VNNI && K > 0 && !(ap = offset_copy(M, K, A, lda))) return QK_ERR_MEMORY;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t j0 = b * INT8_N_BLOCK, j1 = j0 + INT8_N_BLOCK < N ? j0 + INT8_N_BLOCK : N;
        if (K == 0) {
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = j0; j < j1; j++) C[i * ldc + j] = 0;
            continue;
        }
#if defined(__x86_64__)
        if (path == QK_PATH_VNNI) {
            gemm_vnni_block(M, j0, j1, K, A, lda, ap, K, B, ldb, bsum, C, ldc);
            continue;
        }
        if (path == QK_PATH_AVX2) {
            gemm_avx2_block(M, j0, j1, K, A, lda, B, ldb, C, ldc, N);
            continue;
        }
#endif
        gemm_generic_block(M, j0, j1, K, A, lda, B, ldb, C, ldc);
    }
    free(ap);
    return QK_OK;
}

EXPORT int qk_cpu_linear_w8_f32(int path, int64_t M, int64_t N, int64_t K, const float *X,
                                int64_t ldx, const int8_t *W, int64_t ldw, const float *scale,
                                const float *bias, float *Y, int64_t ldy, int threads) {
    if (!path_supported(path)) return QK_ERR_UNSUPPORTED;
    if (!check_shapes(M, N, K, ldx, ldw, ldy)) return QK_ERR_ARGUMENT;
    if (M == 0 || N == 0) return QK_OK;
    if (path == QK_PATH_AMX) path = QK_PATH_VNNI;   /* no AMX kernel of the float product */
    int64_t blocks = (N + N_BLOCK - 1) / N_BLOCK;
    if (threads < 1) threads = 1;
    int failed = 0;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1) \
        reduction(| : failed)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t j0 = b * N_BLOCK, j1 = j0 + N_BLOCK < N ? j0 + N_BLOCK : N;
#if defined(__x86_64__)
        if (path == QK_PATH_VNNI && M < QK_W8_PACKED_MIN_ROWS) {
            w8_avx512_block(M, j0, j1, K, X, ldx, W, ldw, scale, bias, Y, ldy, N);
            continue;
        }
        if (path != QK_PATH_GENERIC && M >= QK_W8_PACKED_MIN_ROWS) {
            float *panel = aligned_alloc(32, sizeof(float) * W8_KC * N_BLOCK);
            float *sums = malloc(sizeof(float) * W8_M_BLOCK * N_BLOCK);
            if (panel && sums) {
                for (int64_t i0 = 0; i0 < M; i0 += W8_M_BLOCK)   /* same chains, fewer bytes */
                    w8_avx2_chain_block(M - i0 < W8_M_BLOCK ? M - i0 : W8_M_BLOCK, j0, j1, K,
                                        X + i0 * ldx, ldx, W, ldw, scale, bias, Y + i0 * ldy,
                                        ldy, panel, sums);
            } else {
                failed = 1;
            }
            free(panel);
            free(sums);
            continue;
        }
        if (path != QK_PATH_GENERIC) {
            w8_avx2_block(M, j0, j1, K, X, ldx, W, ldw, scale, bias, Y, ldy, N);
            continue;
        }
#endif
        w8_generic_block(M, j0, j1, K, X, ldx, W, ldw, scale, bias, Y, ldy);
    }
    return failed ? QK_ERR_MEMORY : QK_OK;
}

EXPORT int qk_cpu_linear_w8a8_f32(int path, int64_t M, int64_t N, int64_t K, const int8_t *A,
                                  int64_t lda, const int8_t *B, int64_t ldb, const int32_t *bsum,
                                  const float *sx, const float *sw, const float *bias, float *Y,
                                  int64_t ldy, int threads) {
    if (!path_supported(path)) return QK_ERR_UNSUPPORTED;
    if (!check_shapes(M, N, K, lda, ldb, ldy)) return QK_ERR_ARGUMENT;
    if (M == 0 || N == 0) return QK_OK;
    int64_t blocks = (N + INT8_N_BLOCK - 1) / INT8_N_BLOCK;
    if (threads < 1) threads = 1;
#ifdef QK_HAVE_AMX
    if (path == QK_PATH_AMX && K > 0) {
        amx_out out = {NULL, 0, Y, ldy, sx, sw, bias, NULL, 0, 0};
        return amx_product(M, N, K, A, lda, B, ldb, &out, threads);
    }
#endif
    uint8_t *ap = NULL;
    if (path == QK_PATH_VNNI && K > 0 && !(ap = offset_copy(M, K, A, lda))) return QK_ERR_MEMORY;
    int failed = 0;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1) \
        reduction(| : failed)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t j0 = b * INT8_N_BLOCK;
        int64_t j1 = j0 + INT8_N_BLOCK < N ? j0 + INT8_N_BLOCK : N, nc = j1 - j0;
        int32_t *acc = malloc(sizeof(int32_t) * M_BLOCK * INT8_N_BLOCK);
        if (!acc) {
            failed = 1;
            continue;
        }
        const int8_t *Bj = B + j0 * ldb;
        for (int64_t i0 = 0; i0 < M; i0 += M_BLOCK) {      /* a block of rows, then its rescale */
            int64_t mc = M - i0 < M_BLOCK ? M - i0 : M_BLOCK;
            const int8_t *Ai = A + i0 * lda;
            if (K == 0) {
                for (int64_t e = 0; e < M_BLOCK * INT8_N_BLOCK; e++) acc[e] = 0;
            }
#if defined(__x86_64__)
            else if (path == QK_PATH_VNNI)
                gemm_vnni_block(mc, 0, nc, K, Ai, lda, ap + i0 * K, K, Bj, ldb,
                                bsum ? bsum + j0 : NULL, acc, INT8_N_BLOCK);
            else if (path == QK_PATH_AVX2)
                gemm_avx2_block(mc, 0, nc, K, Ai, lda, Bj, ldb, acc, INT8_N_BLOCK, N - j0);
#endif
            else
                gemm_generic_block(mc, 0, nc, K, Ai, lda, Bj, ldb, acc, INT8_N_BLOCK);
            for (int64_t i = 0; i < mc; i++)
                for (int64_t c = 0; c < nc; c++) {
                    float y = (float)acc[i * INT8_N_BLOCK + c] * (sx[i0 + i] * sw[j0 + c]);
                    Y[(i0 + i) * ldy + j0 + c] = bias ? y + bias[j0 + c] : y;
                }
        }
        free(acc);
    }
    free(ap);
    return failed ? QK_ERR_MEMORY : QK_OK;
}

static int check_block(int64_t K, int64_t block, int64_t multiple) {
    return block > 0 && block % multiple == 0 && K % block == 0;
}

EXPORT int qk_cpu_linear_w8b_f32(int path, int64_t M, int64_t N, int64_t K, const float *X,
                                 int64_t ldx, const int8_t *W, int64_t ldw, const float *S,
                                 int64_t block, const float *bias, float *Y, int64_t ldy,
                                 int threads) {
    if (!path_supported(path)) return QK_ERR_UNSUPPORTED;
    if (!check_shapes(M, N, K, ldx, ldw, ldy) || !check_block(K, block, 8)) return QK_ERR_ARGUMENT;
    if (M == 0 || N == 0) return QK_OK;
    int64_t blocks = (N + N_BLOCK - 1) / N_BLOCK;
    if (threads < 1) threads = 1;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t j0 = b * N_BLOCK, j1 = j0 + N_BLOCK < N ? j0 + N_BLOCK : N;
#if defined(__x86_64__)
        if (path != QK_PATH_GENERIC) {
            w8b_avx2_block(M, j0, j1, K, X, ldx, W, ldw, S, block, bias, Y, ldy, N);
            continue;
        }
#endif
        w8b_generic_block(M, j0, j1, K, X, ldx, W, ldw, S, block, bias, Y, ldy);
    }
    return QK_OK;
}

EXPORT int qk_cpu_linear_w8a8b_f32(int path, int64_t M, int64_t N, int64_t K, const int8_t *A,
                                   int64_t lda, const int8_t *B, int64_t ldb, const float *sx,
                                   const float *S, int64_t block, const float *bias, float *Y,
                                   int64_t ldy, int threads) {
    if (!path_supported(path)) return QK_ERR_UNSUPPORTED;
    if (!check_shapes(M, N, K, lda, ldb, ldy) || !check_block(K, block, 1)) return QK_ERR_ARGUMENT;
    if (M == 0 || N == 0) return QK_OK;
    if (threads < 1) threads = 1;
#ifdef QK_HAVE_AMX
    if (path == QK_PATH_AMX && K > 0 && block % AMX_K == 0) {
        amx_out out = {NULL, 0, Y, ldy, sx, NULL, bias, S, K / block, block};
        return amx_product(M, N, K, A, lda, B, ldb, &out, threads);
    }
#endif
    if (path == QK_PATH_AMX) path = QK_PATH_VNNI;   /* blocks of other sizes: VNNI's kernel */
    int64_t blocks = (N + INT8_N_BLOCK - 1) / INT8_N_BLOCK, groups = K / block;
    if (threads < 1) threads = 1;
    uint8_t *ap = NULL;
    if (path == QK_PATH_VNNI && !(ap = offset_copy(M, K, A, lda))) return QK_ERR_MEMORY;
#if defined(__x86_64__)
    if (path == QK_PATH_VNNI && K > 0 && block % 4 == 0) {
        int code = vb_product(M, N, K, ap, B, ldb, sx, S, block, bias, Y, ldy, threads);
        free(ap);
        return code;
    }
#endif
    int failed = 0;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1) \
        reduction(| : failed)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t j0 = b * INT8_N_BLOCK;
        int64_t j1 = j0 + INT8_N_BLOCK < N ? j0 + INT8_N_BLOCK : N, nc = j1 - j0;
        int32_t *acc = malloc(sizeof(int32_t) * M_BLOCK * INT8_N_BLOCK);
        float *t = malloc(sizeof(float) * M_BLOCK * INT8_N_BLOCK);
        if (!acc || !t) {
            failed = 1;
            free(acc);
            free(t);
            continue;
        }
        const int8_t *Bj = B + j0 * ldb;
        for (int64_t i0 = 0; i0 < M; i0 += M_BLOCK) {
            int64_t mc = M - i0 < M_BLOCK ? M - i0 : M_BLOCK;
            const int8_t *Ai = A + i0 * lda;
            for (int64_t e = 0; e < M_BLOCK * INT8_N_BLOCK; e++) t[e] = 0.0f;
            for (int64_t g = 0; g < groups; g++) {   /* one exact int32 product per block of K */
                int64_t k0 = g * block;
#if defined(__x86_64__)
                if (path == QK_PATH_VNNI)
                    gemm_vnni_block(mc, 0, nc, block, Ai + k0, lda, ap + i0 * K + k0, K, Bj + k0,
                                    ldb, NULL, acc, INT8_N_BLOCK);
                else if (path == QK_PATH_AVX2)
                    gemm_avx2_block(mc, 0, nc, block, Ai + k0, lda, Bj + k0, ldb, acc,
                                    INT8_N_BLOCK, N - j0);
                else
#endif
                    gemm_generic_block(mc, 0, nc, block, Ai + k0, lda, Bj + k0, ldb, acc,
                                       INT8_N_BLOCK);
                for (int64_t i = 0; i < mc; i++)
                    for (int64_t c = 0; c < nc; c++) {
                        int64_t e = i * INT8_N_BLOCK + c;
                        float term = (float)acc[e] * S[(j0 + c) * groups + g];
                        t[e] = t[e] + term;
                    }
            }
            for (int64_t i = 0; i < mc; i++)
                for (int64_t c = 0; c < nc; c++) {
                    float y = t[i * INT8_N_BLOCK + c] * sx[i0 + i];
                    Y[(i0 + i) * ldy + j0 + c] = bias ? y + bias[j0 + c] : y;
                }
        }
        free(acc);
        free(t);
    }
    free(ap);
    return failed ? QK_ERR_MEMORY : QK_OK;
}
