// Calibration statistics on the device: |x|max per tensor / channel / block, and a histogram of |x|
// with per-bin count, sum and sum of squares. Both count the non-finite inputs in the same pass and
// leave them out of the statistics.
#include "common.cuh"

namespace quantkit {
namespace {

// max |x| as the bit pattern of |x|: for non-negative finite floats the uint32 order is the float
// order, so an integer max (and atomicMax) computes it exactly. Non-finite values are counted and
// skipped.
struct AbsMax {
  uint32_t bits = 0;
  unsigned long long bad = 0;
  __device__ __forceinline__ void add(float v) {
    const uint32_t b = __float_as_uint(v) & 0x7fffffffu;
    const bool nonfinite = b >= 0x7f800000u;
    bad += nonfinite;
    bits = max(bits, nonfinite ? 0u : b);
  }
  __device__ __forceinline__ void add(float4 v) {
    add(v.x);
    add(v.y);
    add(v.z);
    add(v.w);
  }
};

// Rows r in [0, rows) hold elements [r * row_len, min((r + 1) * row_len, n)); row r updates
// out_bits[r % channels]. Each row is cut into segments of seg_len elements and each warp reduces
// one segment per step (16-byte loads after a scalar head that reaches 16-byte alignment), then
// lane 0 merges it with atomicMax. Covers per tensor (one row), per channel with long rows
// (rows = outer * channels, row_len = inner) and blockwise (row = block, channels = rows).
__global__ void __launch_bounds__(kThreads)
    k_absmax_rows(const float *__restrict__ x, int64_t n, int64_t row_len, int64_t channels,
                  int64_t seg_len, int64_t segs_per_row, int64_t items, uint32_t *out_bits,
                  unsigned long long *nonfinite) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = grid_threads() >> 5;
  unsigned long long bad = 0;
  for (int64_t w = global_thread() >> 5; w < items; w += warps) {
    const uint64_t row = udiv(static_cast<uint64_t>(w), static_cast<uint64_t>(segs_per_row));
    const int64_t seg = w - static_cast<int64_t>(row) * segs_per_row;
    const int64_t row_start = static_cast<int64_t>(row) * row_len;
    const int64_t start = row_start + seg * seg_len;
    const int64_t row_end = row_start + row_len < n ? row_start + row_len : n;
    const int64_t end = start + seg_len < row_end ? start + seg_len : row_end;
    AbsMax acc;
    if (start < end) {
      const float *p = x + start;
      const int64_t len = end - start;
      const uintptr_t misalign = reinterpret_cast<uintptr_t>(p) & 15u;
      int64_t head = static_cast<int64_t>((16u - misalign) & 15u) >> 2;  // floats to alignment
      if (head > len) head = len;
      for (int64_t i = lane; i < head; i += 32) acc.add(__ldg(p + i));
      const float4 *pv = reinterpret_cast<const float4 *>(p + head);
      const int64_t nv = (len - head) >> 2;
      int64_t i = lane;
      for (; i + 96 < nv; i += 128) {
        const float4 a = __ldg(pv + i), b = __ldg(pv + i + 32), c = __ldg(pv + i + 64),
                     d = __ldg(pv + i + 96);
        acc.add(a);
        acc.add(b);
        acc.add(c);
        acc.add(d);
      }
      for (; i < nv; i += 32) acc.add(__ldg(pv + i));
      for (int64_t k = head + nv * 4 + lane; k < len; k += 32) acc.add(__ldg(p + k));
    }
    const uint32_t bits = warp_max(acc.bits);
    if (lane == 0 && bits != 0) {
      const uint64_t c = row - udiv(row, static_cast<uint64_t>(channels)) * channels;
      atomicMax(out_bits + c, bits);
    }
    bad += acc.bad;
  }
  add_count(nonfinite, bad);
}

// x viewed as (outer, cols) with cols = channels * inner; column j belongs to channel j / inner.
// Threads run along columns (coalesced), blockIdx.y picks a slab of rows_per_split rows; one
// atomicMax per thread and column. Used when rows are short (inner small), e.g. axis = -1.
__global__ void __launch_bounds__(kThreads)
    k_absmax_columns(const float *__restrict__ x, int64_t outer, int64_t cols, int64_t inner,
                     int64_t rows_per_split, uint32_t *out_bits, unsigned long long *nonfinite) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < outer ? r0 + rows_per_split : outer;
  unsigned long long bad = 0;
  for (int64_t col = global_thread(); col < cols; col += grid_threads()) {
    AbsMax acc;
#pragma unroll 4
    for (int64_t r = r0; r < r1; ++r) acc.add(__ldg(x + r * cols + col));
    if (acc.bits != 0)
      atomicMax(out_bits + udiv(static_cast<uint64_t>(col), static_cast<uint64_t>(inner)),
                acc.bits);
    bad += acc.bad;
  }
  add_count(nonfinite, bad);
}

// Histogram of |x| (see qk_abs_histogram_f32). Shared: the block accumulates in shared memory
// (sums, sums of squares, counts; 24 bytes per bin) and merges into the outputs at the end;
// otherwise it adds to the outputs directly.
template <bool Shared, bool Vector>
__global__ void __launch_bounds__(kThreads)
    k_abs_histogram(const float *__restrict__ x, int64_t n, int bins, float inv_width,
                    unsigned long long *counts, double *sums, double *sumsq,
                    unsigned long long *nonfinite) {
  extern __shared__ double shared[];
  double *s1 = sums, *s2 = sumsq;
  unsigned long long *cnt = counts;
  if constexpr (Shared) {
    s1 = shared;
    s2 = shared + bins;
    cnt = reinterpret_cast<unsigned long long *>(shared + 2 * bins);
    for (int b = threadIdx.x; b < bins; b += blockDim.x) {
      s1[b] = 0.0;
      s2[b] = 0.0;
      cnt[b] = 0ull;
    }
    __syncthreads();
  }
  const float top = static_cast<float>(bins);
  unsigned long long bad = 0;
  auto add = [&](float v) {
    if (is_nonfinite(v)) {
      ++bad;
      return;
    }
    const float a = fabsf(v);
    const float t = __fmul_rn(a, inv_width);
    const int b = t < top ? static_cast<int>(t) : bins - 1;  // t >= 0: truncation is floor
    const double d = static_cast<double>(a);
    atomicAdd(cnt + b, 1ull);
    atomicAdd(s1 + b, d);
    atomicAdd(s2 + b, d * d);
  };
  for_each_grid_stride<Vector>(x, n, add);
  add_count(nonfinite, bad);
  if constexpr (Shared) {
    __syncthreads();
    for (int b = threadIdx.x; b < bins; b += blockDim.x) {
      if (cnt[b] != 0) {
        atomicAdd(counts + b, cnt[b]);
        atomicAdd(sums + b, s1[b]);
        atomicAdd(sumsq + b, s2[b]);
      }
    }
  }
}

// Log histogram of |x| (see qk_abs_histogram_log_f32): integer atomics straight into the outputs,
// exact whatever the order.
template <bool Vector>
__global__ void __launch_bounds__(kThreads)
    k_abs_histogram_log(const float *__restrict__ x, int64_t n, unsigned long long *counts,
                        unsigned long long *sum_res, unsigned long long *sum_res2,
                        unsigned long long *nonfinite) {
  unsigned long long bad = 0;
  auto add = [&](float v) {
    const uint32_t b = __float_as_uint(v) & 0x7fffffffu;
    if (b >= 0x7f800000u) {
      ++bad;
      return;
    }
    const uint32_t bin = b >> QK_LOG_HISTOGRAM_SHIFT;
    const unsigned long long r = b & ((1u << QK_LOG_HISTOGRAM_SHIFT) - 1u);
    atomicAdd(counts + bin, 1ull);
    atomicAdd(sum_res + bin, r);
    atomicAdd(sum_res2 + bin, r * r);
  };
  for_each_grid_stride<Vector>(x, n, add);
  add_count(nonfinite, bad);
}

// Fixed-point error sums for up to QK_MAX_SSE_CANDIDATES alphas (see qk_sse_fixed_many_f32). Each
// thread keeps one 64-bit accumulator per candidate; warps merge them with one atomic each.
template <bool Vector>
__global__ void __launch_bounds__(kThreads, 2)
    k_sse_fixed_many(const float *__restrict__ x, int64_t n, const float *__restrict__ scales,
                     const float *__restrict__ inv_scales, int k, double unit_inv,
                     unsigned long long *out, unsigned long long *nonfinite) {
  constexpr int K = QK_MAX_SSE_CANDIDATES;
  float sc[K], iv[K];
  unsigned long long acc[K];
#pragma unroll
  for (int j = 0; j < K; ++j) {
    sc[j] = j < k ? __ldg(scales + j) : 0.0f;
    iv[j] = j < k ? __ldg(inv_scales + j) : 0.0f;
    acc[j] = 0ull;
  }
  unsigned long long bad = 0;
  auto add = [&](float v) {
    if (is_nonfinite(v)) {
      ++bad;
      return;
    }
    const float a = fabsf(v);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if (j < k) {
        const float y = fminf(rintf(__fmul_rn(a, iv[j])), static_cast<float>(QK_QMAX));
        const double e = static_cast<double>(__fsub_rn(a, __fmul_rn(y, sc[j])));
        acc[j] += static_cast<unsigned long long>(__double2ll_rz(__dmul_rn(__dmul_rn(e, e),
                                                                           unit_inv)));
      }
    }
  };
  for_each_grid_stride<Vector>(x, n, add);
#pragma unroll
  for (int j = 0; j < K; ++j) {
    if (j < k) add_count(out + j, acc[j]);  // k is uniform: every lane takes the same branches
  }
  add_count(nonfinite, bad);
}

// ------------------------------------------------------------------------------ launchers

cudaError_t device_shape(int *sms, int *warps_per_sm) {
  int device = 0, threads = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&threads, cudaDevAttrMaxThreadsPerMultiProcessor, device);
  *warps_per_sm = threads / 32;
  return err;
}

cudaError_t launch_absmax_rows(const float *x, int64_t n, int64_t row_len, int64_t rows,
                               int64_t channels, uint32_t *out_bits, unsigned long long *counter,
                               cudaStream_t stream) {
  int sms = 0, warps_per_sm = 0;
  cudaError_t err = device_shape(&sms, &warps_per_sm);
  if (err != cudaSuccess) return err;
  // About two segments per resident warp; segments of at least 512 elements (a multiple of 4, so
  // consecutive segments keep the row's alignment).
  const int64_t target = static_cast<int64_t>(sms) * warps_per_sm * 2;
  int64_t seg_len = (n + target - 1) / target;
  seg_len = (seg_len + 511) / 512 * 512;
  int64_t segs = 1;
  if (seg_len >= row_len) {
    seg_len = row_len;
  } else {
    segs = (row_len + seg_len - 1) / seg_len;
  }
  const int64_t items = rows * segs;
  int blocks = 0;
  err = grid_blocks(items * 32, &blocks);
  if (err != cudaSuccess) return err;
  k_absmax_rows<<<blocks, kThreads, 0, stream>>>(x, n, row_len, channels, seg_len, segs, items,
                                                 out_bits, counter);
  return cudaGetLastError();
}

cudaError_t launch_absmax_columns(const float *x, int64_t outer, int64_t channels, int64_t inner,
                                  uint32_t *out_bits, unsigned long long *counter,
                                  cudaStream_t stream) {
  int sms = 0, warps_per_sm = 0;
  cudaError_t err = device_shape(&sms, &warps_per_sm);
  if (err != cudaSuccess) return err;
  const int64_t cols = channels * inner;
  int64_t blocks_x = (cols + kThreads - 1) / kThreads;
  const int64_t target_blocks = static_cast<int64_t>(sms) * (warps_per_sm * 32 / kThreads) * 2;
  if (blocks_x > target_blocks) blocks_x = target_blocks;
  int64_t splits = target_blocks / blocks_x;
  if (splits < 1) splits = 1;
  if (splits > outer) splits = outer;
  if (splits > 65535) splits = 65535;
  const int64_t rows_per_split = (outer + splits - 1) / splits;
  splits = (outer + rows_per_split - 1) / rows_per_split;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(splits));
  k_absmax_columns<<<grid, kThreads, 0, stream>>>(x, outer, cols, inner, rows_per_split, out_bits,
                                                  counter);
  return cudaGetLastError();
}

// Rows of at least this many elements use the row kernel for per-channel |x|max.
constexpr int64_t kMinRow = 128;

cudaError_t zero_outputs(void *out, size_t out_bytes, uint64_t *nonfinite, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(nonfinite, 0, sizeof(uint64_t), stream);
  if (err == cudaSuccess && out_bytes > 0) err = cudaMemsetAsync(out, 0, out_bytes, stream);
  return err;
}

}  // namespace
}  // namespace quantkit

using namespace quantkit;

extern "C" {

QK_API cudaError_t qk_absmax_f32(const float *x, int64_t n, float *out, uint64_t *nonfinite,
                                 int device, cudaStream_t stream) {
  if (n < 0 || out == nullptr || nonfinite == nullptr || (n > 0 && x == nullptr))
    return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  cudaError_t err = zero_outputs(out, sizeof(float), nonfinite, stream);
  if (err != cudaSuccess || n == 0) return err;
  return launch_absmax_rows(x, n, n, 1, 1, reinterpret_cast<uint32_t *>(out),
                            reinterpret_cast<unsigned long long *>(nonfinite), stream);
}

QK_API cudaError_t qk_absmax_per_channel_f32(const float *x, int64_t outer, int64_t channels,
                                             int64_t inner, float *out, uint64_t *nonfinite,
                                             int device, cudaStream_t stream) {
  const int64_t n = channel_view_size(outer, channels, inner);
  if (n < 0 || nonfinite == nullptr || (channels > 0 && out == nullptr) ||
      (n > 0 && x == nullptr))
    return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  cudaError_t err =
      zero_outputs(out, static_cast<size_t>(channels) * sizeof(float), nonfinite, stream);
  if (err != cudaSuccess || n == 0) return err;
  auto *bits = reinterpret_cast<uint32_t *>(out);
  auto *counter = reinterpret_cast<unsigned long long *>(nonfinite);
  if (inner >= kMinRow)
    return launch_absmax_rows(x, n, inner, outer * channels, channels, bits, counter, stream);
  return launch_absmax_columns(x, outer, channels, inner, bits, counter, stream);
}

QK_API cudaError_t qk_absmax_blockwise_f32(const float *x, int64_t n, int64_t block_size,
                                           float *out, uint64_t *nonfinite, int device,
                                           cudaStream_t stream) {
  if (n < 0 || !is_block_size(block_size) || nonfinite == nullptr ||
      (n > 0 && (x == nullptr || out == nullptr)))
    return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  const int64_t blocks = (n + block_size - 1) / block_size;
  cudaError_t err =
      zero_outputs(out, static_cast<size_t>(blocks) * sizeof(float), nonfinite, stream);
  if (err != cudaSuccess || n == 0) return err;
  return launch_absmax_rows(x, n, block_size, blocks, blocks, reinterpret_cast<uint32_t *>(out),
                            reinterpret_cast<unsigned long long *>(nonfinite), stream);
}

QK_API cudaError_t qk_abs_histogram_f32(const float *x, int64_t n, int64_t bins, float inv_width,
                                        uint64_t *counts, double *sums, double *sumsq,
                                        uint64_t *nonfinite, int device, cudaStream_t stream) {
  const bool width_ok = inv_width > 0.0f && inv_width <= 3.4028234663852886e38f;  // finite, > 0
  if (n < 0 || bins < 1 || bins > QK_MAX_HISTOGRAM_BINS || !width_ok || counts == nullptr ||
      sums == nullptr || sumsq == nullptr || nonfinite == nullptr || (n > 0 && x == nullptr))
    return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  const size_t b = static_cast<size_t>(bins);
  cudaError_t err = zero_outputs(counts, b * sizeof(uint64_t), nonfinite, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(sums, 0, b * sizeof(double), stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(sumsq, 0, b * sizeof(double), stream);
  if (err != cudaSuccess || n == 0) return err;

  auto *cnt = reinterpret_cast<unsigned long long *>(counts);
  auto *counter = reinterpret_cast<unsigned long long *>(nonfinite);
  const int nbins = static_cast<int>(bins);
  const size_t shared_bytes = 3 * b * sizeof(double);
  const bool shared = shared_bytes <= 48 * 1024;
  const bool vector = aligned16(x);
  int blocks = 0;
  err = grid_blocks(vector ? (n + 3) / 4 : n, &blocks);
  if (err != cudaSuccess) return err;
  if (shared) {
    // One resident wave: every block merges its whole shared histogram into the outputs once.
    int sms = 0, warps_per_sm = 0, per_sm = 0;
    err = device_shape(&sms, &warps_per_sm);
    if (err != cudaSuccess) return err;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, vector ? k_abs_histogram<true, true> : k_abs_histogram<true, false>, kThreads,
        shared_bytes);
    if (err != cudaSuccess) return err;
    const int wave = sms * (per_sm > 0 ? per_sm : 1);
    if (blocks > wave) blocks = wave;
    if (vector)
      k_abs_histogram<true, true><<<blocks, kThreads, shared_bytes, stream>>>(
          x, n, nbins, inv_width, cnt, sums, sumsq, counter);
    else
      k_abs_histogram<true, false><<<blocks, kThreads, shared_bytes, stream>>>(
          x, n, nbins, inv_width, cnt, sums, sumsq, counter);
  } else if (vector) {
    k_abs_histogram<false, true><<<blocks, kThreads, 0, stream>>>(x, n, nbins, inv_width, cnt,
                                                                  sums, sumsq, counter);
  } else {
    k_abs_histogram<false, false><<<blocks, kThreads, 0, stream>>>(x, n, nbins, inv_width, cnt,
                                                                   sums, sumsq, counter);
  }
  return cudaGetLastError();
}

QK_API cudaError_t qk_abs_histogram_log_f32(const float *x, int64_t n, uint64_t *counts,
                                            uint64_t *sum_res, uint64_t *sum_res2,
                                            uint64_t *nonfinite, int device, cudaStream_t stream) {
  if (n < 0 || counts == nullptr || sum_res == nullptr || sum_res2 == nullptr ||
      nonfinite == nullptr || (n > 0 && x == nullptr))
    return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  const size_t bytes = static_cast<size_t>(QK_LOG_HISTOGRAM_BINS) * sizeof(uint64_t);
  cudaError_t err = zero_outputs(counts, bytes, nonfinite, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(sum_res, 0, bytes, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(sum_res2, 0, bytes, stream);
  if (err != cudaSuccess || n == 0) return err;
  auto *c = reinterpret_cast<unsigned long long *>(counts);
  auto *s1 = reinterpret_cast<unsigned long long *>(sum_res);
  auto *s2 = reinterpret_cast<unsigned long long *>(sum_res2);
  auto *counter = reinterpret_cast<unsigned long long *>(nonfinite);
  int blocks = 0;
  if (aligned16(x)) {
    err = grid_blocks((n + 3) / 4, &blocks);
    if (err != cudaSuccess) return err;
    k_abs_histogram_log<true><<<blocks, kThreads, 0, stream>>>(x, n, c, s1, s2, counter);
  } else {
    err = grid_blocks(n, &blocks);
    if (err != cudaSuccess) return err;
    k_abs_histogram_log<false><<<blocks, kThreads, 0, stream>>>(x, n, c, s1, s2, counter);
  }
  return cudaGetLastError();
}

QK_API cudaError_t qk_sse_fixed_many_f32(const float *x, int64_t n, const float *scales,
                                         const float *inv_scales, int64_t k, double unit_inv,
                                         uint64_t *out, uint64_t *nonfinite, int device,
                                         cudaStream_t stream) {
  if (n < 0 || k < 1 || k > QK_MAX_SSE_CANDIDATES || scales == nullptr ||
      inv_scales == nullptr || out == nullptr || nonfinite == nullptr ||
      !(unit_inv >= 0.0 && unit_inv <= 1.7976931348623157e308) || (n > 0 && x == nullptr))
    return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  cudaError_t err = zero_outputs(out, static_cast<size_t>(k) * sizeof(uint64_t), nonfinite, stream);
  if (err != cudaSuccess || n == 0) return err;
  auto *o = reinterpret_cast<unsigned long long *>(out);
  auto *counter = reinterpret_cast<unsigned long long *>(nonfinite);
  const int kk = static_cast<int>(k);
  int blocks = 0;
  if (aligned16(x)) {
    err = grid_blocks((n + 3) / 4, &blocks);
    if (err != cudaSuccess) return err;
    k_sse_fixed_many<true><<<blocks, kThreads, 0, stream>>>(x, n, scales, inv_scales, kk,
                                                             unit_inv, o, counter);
  } else {
    err = grid_blocks(n, &blocks);
    if (err != cudaSuccess) return err;
    k_sse_fixed_many<false><<<blocks, kThreads, 0, stream>>>(x, n, scales, inv_scales, kk,
                                                              unit_inv, o, counter);
  }
  return cudaGetLastError();
}

}  // extern "C"
