// Helpers shared by the kernels: the element arithmetic, the non-finite test, reductions, launch
// sizing and the device guard. Internal to the library (nothing here is exported).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "quantkit.h"

namespace quantkit {

constexpr int kThreads = 256;  // threads per block of every kernel

// ------------------------------------------------------------------------------ arithmetic

// True for NaN and +-Inf: the exponent bits are all ones. A bit test, so no compiler flag can fold
// it away.
__device__ __forceinline__ bool is_nonfinite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

// clamp(rint(x * m), -127, 127). __fmul_rn is one correctly rounded float32 product (never fused
// into an FMA); __float2int_rn rounds half to even and saturates out-of-range values (and +-Inf)
// to INT_MIN / INT_MAX, which the clamp maps to -127 / 127, as the reference's clip does.
__device__ __forceinline__ int quantize_code(float x, float m) {
  const int r = __float2int_rn(__fmul_rn(x, m));
  return min(max(r, -QK_QMAX), QK_QMAX);
}

__device__ __forceinline__ float dequantize_code(int q, float s) {
  return __fmul_rn(static_cast<float>(q), s);
}

// 64-bit unsigned division with a 32-bit fast path (64-bit division is a long software routine).
__device__ __forceinline__ uint64_t udiv(uint64_t a, uint64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

// ------------------------------------------------------------------------------- reductions

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = max(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Adds a per-thread count to the global counter: one atomic per warp, and none when it is zero.
// Every thread of the warp must call it (no thread may have returned early).
__device__ __forceinline__ void add_count(unsigned long long *counter, unsigned long long mine) {
  const unsigned long long total = warp_sum(mine);
  if ((threadIdx.x & 31) == 0 && total != 0) atomicAdd(counter, total);
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Calls visit(x[i]) for every i in [0, n) handled by this thread, grid-stride. With Vector (x
// 16-byte aligned) the bulk is read as float4 and only the last n % 4 elements one by one.
template <bool Vector, class Visit>
__device__ __forceinline__ void for_each_grid_stride(const float *__restrict__ x, int64_t n,
                                                     Visit &visit) {
  const int64_t stride = grid_threads();
  int64_t tail = 0;
  if constexpr (Vector) {
    const int64_t steps = n / 4;
    tail = steps * 4;
    const float4 *xv = reinterpret_cast<const float4 *>(x);
    for (int64_t j = global_thread(); j < steps; j += stride) {
      const float4 f = __ldg(xv + j);
      visit(f.x);
      visit(f.y);
      visit(f.z);
      visit(f.w);
    }
  }
  for (int64_t i = tail + global_thread(); i < n; i += stride) visit(__ldg(x + i));
}

// ------------------------------------------------------------------------------------ host

// Sets the runtime's current device to `device` for the lifetime of the guard and restores the
// previous one after, so the caller's (e.g. torch's) current device is left as it was.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) {
      status_ = cudaSetDevice(device);
      switched_ = status_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard &) = delete;
  DeviceGuard &operator=(const DeviceGuard &) = delete;
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  bool switched_ = false;
  cudaError_t status_ = cudaSuccess;
};

// Blocks for a grid-stride kernel doing `work` items of one thread each: enough to cover the work,
// at most a few waves of full occupancy (the loop covers the rest).
inline cudaError_t grid_blocks(int64_t work, int *blocks) {
  int device = 0, sms = 0, threads_per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device);
  if (err != cudaSuccess) return err;
  const int64_t cap = static_cast<int64_t>(sms) * (threads_per_sm / kThreads) * 4;
  int64_t needed = (work + kThreads - 1) / kThreads;
  if (needed < 1) needed = 1;
  *blocks = static_cast<int>(needed < cap ? needed : cap);
  return cudaSuccess;
}

// n = outer * channels * inner (the elements of a per-channel view) without overflow, or -1.
inline int64_t channel_view_size(int64_t outer, int64_t channels, int64_t inner) {
  if (outer < 0 || channels < 0 || inner < 0) return -1;
  if (outer == 0 || channels == 0 || inner == 0) return 0;
  if (outer > INT64_MAX / channels) return -1;
  const int64_t oc = outer * channels;
  if (oc > INT64_MAX / inner) return -1;
  return oc * inner;
}

inline bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline bool is_block_size(int64_t b) {
  return b >= QK_MIN_BLOCK_SIZE && b <= QK_MAX_BLOCK_SIZE && (b & (b - 1)) == 0;
}

inline int log2_exact(int64_t b) {
  int k = 0;
  while ((int64_t{1} << k) < b) ++k;
  return k;
}

}  // namespace quantkit
