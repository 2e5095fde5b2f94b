/* quantkit's CUDA library: the C ABI.
 *
 * Every function takes raw device pointers, sizes as int64_t (tensors over 2^31 elements work), the
 * CUDA device the pointers live on and a cudaStream_t, enqueues its kernels on that stream and
 * returns a cudaError_t (cudaSuccess, an argument error as cudaErrorInvalidValue, or the launch
 * error). Nothing is synchronised: results are valid once the stream reaches them.
 *
 * The arithmetic is docs/DESIGN.md section 1, exactly as quantkit/reference.py computes it:
 *
 *     q     = clamp(rint(x * inv_scale), -QK_QMAX, QK_QMAX)      rint: round half to even
 *     x_hat = float32(q) * scale
 *
 * The host computes inv_scale = float32(127 / alpha) (0 where alpha == 0) and
 * scale = float32(alpha / 127); kernels only multiply (never divide, no fast-math, no FMA).
 *
 * Granularity, for x holding n elements in C order:
 *   per tensor    one multiplier: inv_scale[0];
 *   per channel   x viewed as (outer, channels, inner): element i uses
 *                 inv_scale[(i / inner) % channels]
 *                 (axis k of any shape: outer = prod(shape[:k]), channels = shape[k],
 *                 inner = prod(shape[k+1:]));
 *   blockwise     element i uses inv_scale[i / block_size]; block_size a power of two in
 *                 [QK_MIN_BLOCK_SIZE, QK_MAX_BLOCK_SIZE]; the last block may be short.
 *
 * Quantize and statistics functions count the non-finite (NaN, +-Inf) inputs in the same pass and
 * store the count in *nonfinite (a device uint64, overwritten, not accumulated).
 */
#ifndef QUANTKIT_H
#define QUANTKIT_H

#include <stdint.h>

#include <cuda_runtime_api.h>

/* Mirrors of quantkit/_constants.py (tests/test_cuda_header.py checks that they agree). */
#define QK_QMAX 127
#define QK_MIN_BLOCK_SIZE 64
#define QK_MAX_BLOCK_SIZE 4096
/* Smallest positive alpha (float32(127) / FLT_MAX rounded up): the host rejects 0 < alpha < this,
 * so inv_scale = 127 / alpha is always finite. Kernels never see alpha itself. */
#define QK_MIN_POSITIVE_ALPHA 3.7321948e-37f
/* Largest alpha (one float32 step below FLT_MAX, where 127 * float32(alpha / 127) is still
 * finite): the host rejects larger ones. */
#define QK_MAX_ALPHA 3.4028233e38f

/* Bumped whenever a signature below changes; quantkit/backends/cuda_library.py refuses another
 * version. */
#define QK_ABI_VERSION 1

/* Largest bin count for qk_abs_histogram_f32. */
#define QK_MAX_HISTOGRAM_BINS (1 << 20)

/* Log histogram of qk_abs_histogram_log_f32 (mirrors HIST_SHIFT / HIST_BINS of
 * quantkit/backends/numba_calib.py): bin = float32 bits of |x| >> 16; every finite float has one.
 */
#define QK_LOG_HISTOGRAM_SHIFT 16
#define QK_LOG_HISTOGRAM_BINS (255 << 7)

/* Most candidate alphas per qk_sse_fixed_many_f32 call. */
#define QK_MAX_SSE_CANDIDATES 16

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define QK_API __attribute__((visibility("default")))
#else
#define QK_API
#endif

/* ------------------------------------------------------------------------------ library info */

QK_API int qk_abi_version(void);
QK_API const char *qk_error_string(int error);
/* Number of CUDA devices the library's runtime sees (0 when there is none or no driver). */
QK_API cudaError_t qk_device_count(int *count);

/* ---------------------------------------------------------------------------------- quantize */

QK_API cudaError_t qk_quantize_int8_f32(const float *x, int8_t *q, int64_t n,
                                        const float *inv_scale, uint64_t *nonfinite, int device,
                                        cudaStream_t stream);

QK_API cudaError_t qk_quantize_int8_per_channel_f32(const float *x, int8_t *q, int64_t outer,
                                                    int64_t channels, int64_t inner,
                                                    const float *inv_scale, uint64_t *nonfinite,
                                                    int device, cudaStream_t stream);

QK_API cudaError_t qk_quantize_int8_blockwise_f32(const float *x, int8_t *q, int64_t n,
                                                  int64_t block_size, const float *inv_scale,
                                                  uint64_t *nonfinite, int device,
                                                  cudaStream_t stream);

/* -------------------------------------------------------------------------------- dequantize */

QK_API cudaError_t qk_dequantize_int8_f32(const int8_t *q, float *x, int64_t n, const float *scale,
                                          int device, cudaStream_t stream);

QK_API cudaError_t qk_dequantize_int8_per_channel_f32(const int8_t *q, float *x, int64_t outer,
                                                      int64_t channels, int64_t inner,
                                                      const float *scale, int device,
                                                      cudaStream_t stream);

QK_API cudaError_t qk_dequantize_int8_blockwise_f32(const int8_t *q, float *x, int64_t n,
                                                    int64_t block_size, const float *scale,
                                                    int device, cudaStream_t stream);

/* ------------------------------------------------------------------- calibration statistics */

/* out[0] = max |x| over the finite elements (0 when there is none); out: float32 on the device. */
QK_API cudaError_t qk_absmax_f32(const float *x, int64_t n, float *out, uint64_t *nonfinite,
                                 int device, cudaStream_t stream);

/* out[c] = max |x| over channel c of the (outer, channels, inner) view (finite elements only). */
QK_API cudaError_t qk_absmax_per_channel_f32(const float *x, int64_t outer, int64_t channels,
                                             int64_t inner, float *out, uint64_t *nonfinite,
                                             int device, cudaStream_t stream);

/* out[b] = max |x| over block b (ceil(n / block_size) blocks; finite elements only). */
QK_API cudaError_t qk_absmax_blockwise_f32(const float *x, int64_t n, int64_t block_size,
                                           float *out, uint64_t *nonfinite, int device,
                                           cudaStream_t stream);

/* Histogram of a = |x| over the finite elements, in `bins` bins of [0, hi):
 *     t = float32(a * inv_width)       (inv_width = float32(bins) / float32(hi), from the host)
 *     bin = floor(t) if t < bins else bins - 1        (a >= hi lands in the last bin)
 * counts[bin] += 1, sums[bin] += double(a), sumsq[bin] += double(a) * double(a).
 * The outputs are overwritten. counts are exact; sums and sumsq are float64 sums in an unspecified
 * order (not bit-reproducible). 1 <= bins <= QK_MAX_HISTOGRAM_BINS, inv_width finite and > 0. */
QK_API cudaError_t qk_abs_histogram_f32(const float *x, int64_t n, int64_t bins, float inv_width,
                                        uint64_t *counts, double *sums, double *sumsq,
                                        uint64_t *nonfinite, int device, cudaStream_t stream);

/* Log-spaced histogram of a = |x| over the finite elements: the summary of the "mse" calibration
 * (quantkit/backends/numba_calib.py, histogram_log). With bits = the float32 bit pattern of a:
 *     bin = bits >> QK_LOG_HISTOGRAM_SHIFT,   r = bits & 0xFFFF
 *     counts[bin] += 1, sum_res[bin] += r, sum_res2[bin] += r * r
 * Integer sums, so the result is exact and independent of the order (bit-identical to the CPU
 * kernel). The outputs have QK_LOG_HISTOGRAM_BINS entries and are overwritten. */
QK_API cudaError_t qk_abs_histogram_log_f32(const float *x, int64_t n, uint64_t *counts,
                                            uint64_t *sum_res, uint64_t *sum_res2,
                                            uint64_t *nonfinite, int device, cudaStream_t stream);

/* Fixed-point sums of squared quantization errors for k candidate alphas in one pass over x
 * (numba_calib.sse_fixed_many). For each finite element, a = |x| and each j < k:
 *     y = min(rint(a * inv_scales[j]), 127);  e = a - y * scales[j]        (float32, no FMA)
 *     out[j] += int64(double(e) * double(e) * unit_inv)               ((e * e) first, truncated)
 * scales / inv_scales: float32 on the device, from the host (reference.py's values). Integer sums:
 * exact, bit-identical to the CPU kernel. 1 <= k <= QK_MAX_SSE_CANDIDATES; out is overwritten. */
QK_API cudaError_t qk_sse_fixed_many_f32(const float *x, int64_t n, const float *scales,
                                         const float *inv_scales, int64_t k, double unit_inv,
                                         uint64_t *out, uint64_t *nonfinite, int device,
                                         cudaStream_t stream);

/* ------------------------------------------------------------------------- 8-bit AdamW step */

/* One in-place 8-bit AdamW step (docs/DESIGN.md section 7) on the (rows, length) row-major view
 * of a float32 parameter p and its gradient g: m_codes int8 and r_codes uint8 of the same shape,
 * m_absmax / r_absmax float32 (rows, max(1, length / block_size)); the code maps are
 * (m_levels, m_mbits) and (r_levels, r_mbits) (reference.M_CODE, R_CODE); scalars: 8 float32 on
 * the host (beta1, 1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay, step size,
 * sqrt(1 - beta2**t)). Bit-identical to quantkit/backends/numba_optim.py adamw8bit_step. The
 * gradient must be finite (the caller checks). */
QK_API cudaError_t qk_adamw8bit_step_f32(float *p, const float *g, int8_t *m_codes,
                                         float *m_absmax, uint8_t *r_codes, float *r_absmax,
                                         int64_t rows, int64_t length, int64_t block_size,
                                         int m_levels, int m_mbits, int r_levels, int r_mbits,
                                         const float *scalars, int device, cudaStream_t stream);

/* The same step with float32 moments m and r = sqrt(v), n elements (numba_optim.adamw32_step). */
QK_API cudaError_t qk_adamw32_step_f32(float *p, const float *g, float *m, float *r, int64_t n,
                                       const float *scalars, int device, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* QUANTKIT_H */
