// int8 quantize and dequantize: per tensor, per channel, blockwise (docs/DESIGN.md section 1).
//
// One kernel template per direction, parameterised by how an element finds its multiplier (a
// "Mults" policy below). Grid-stride loops over warp tiles of 512 elements: each thread issues four
// independent 16-byte float loads (quantize) or four 4-byte code loads (dequantize), and every warp
// instruction covers one contiguous span. When the float pointer is not 16-byte aligned or the code
// pointer not 4-byte aligned, the kernels run element by element instead (still coalesced).
// Indices are 64-bit throughout.
#include "common.cuh"

namespace quantkit {
namespace {

// ---------------------------------------------------------------------------- multipliers
// get<V>(i0, m) fills m[k] with the multiplier of element i0 + k, k < V (V = 1, or 4 with i0 a
// multiple of 4).

struct PerTensor {
  const float *s;
  template <int V>
  __device__ __forceinline__ void get(int64_t, float (&m)[V]) const {
    const float v = __ldg(s);
#pragma unroll
    for (int k = 0; k < V; ++k) m[k] = v;
  }
};

// Blocks hold a multiple of 4 elements (block_size >= 64), so a group never straddles two blocks.
struct PerBlock {
  const float *s;
  int shift;  // log2(block_size)
  template <int V>
  __device__ __forceinline__ void get(int64_t i0, float (&m)[V]) const {
    const float v = __ldg(s + (i0 >> shift));
#pragma unroll
    for (int k = 0; k < V; ++k) m[k] = v;
  }
};

// (outer, channels, inner) view: element i is in channel (i / inner) % channels. Uniform: inner is
// a multiple of 4, so the elements of a group share one channel (found once per group); otherwise
// the channel is advanced element by element from the group's first one.
template <bool Uniform>
struct PerChannel {
  const float *s;
  uint64_t channels;
  uint64_t inner;
  template <int V>
  __device__ __forceinline__ void get(int64_t i0, float (&m)[V]) const {
    const uint64_t row = udiv(static_cast<uint64_t>(i0), inner);
    uint64_t c = row - udiv(row, channels) * channels;
    if constexpr (Uniform || V == 1) {
      const float v = __ldg(s + c);
#pragma unroll
      for (int k = 0; k < V; ++k) m[k] = v;
    } else {
      uint64_t pos = static_cast<uint64_t>(i0) - row * inner;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        m[k] = __ldg(s + c);
        if (++pos == inner) {
          pos = 0;
          if (++c == channels) c = 0;
        }
      }
    }
  }
};

// -------------------------------------------------------------------------------- kernels
// Vector path: a warp step covers a tile of kTile consecutive elements. Load k (k < kLoads) of lane
// l is group g = tile * (kTile / 4) + k * 32 + l of 4 elements, so every warp instruction touches
// one contiguous span (512 bytes of float32, 128 bytes of codes), as torch's vectorised kernels
// do. The rest (fewer than kTile elements) runs element by element over all threads.

constexpr int kGroup = 4;                      // elements per float4 load / per 4-byte code word
constexpr int kLoads = 4;                      // independent loads in flight per thread and step
constexpr int kTile = 32 * kGroup * kLoads;    // elements per warp step (512)
constexpr int kTileGroups = kTile / kGroup;    // groups per warp step (128)

template <bool Vector, class Mults>
__global__ void __launch_bounds__(kThreads, 4)
    k_quantize_int8(const float *__restrict__ x, int8_t *__restrict__ q, int64_t n, Mults mults,
                    unsigned long long *__restrict__ nonfinite) {
  unsigned long long bad = 0;
  int64_t tail = 0;
  if constexpr (Vector) {
    const int lane = threadIdx.x & 31;
    const int64_t tiles = n / kTile;
    const int64_t warps = grid_threads() >> 5;
    tail = tiles * kTile;
    const float4 *xv = reinterpret_cast<const float4 *>(x);
    uint32_t *qv = reinterpret_cast<uint32_t *>(q);
    for (int64_t t = global_thread() >> 5; t < tiles; t += warps) {
      const int64_t g0 = t * kTileGroups + lane;
      float4 f[kLoads];
#pragma unroll
      for (int k = 0; k < kLoads; ++k) f[k] = __ldg(xv + g0 + k * 32);
#pragma unroll
      for (int k = 0; k < kLoads; ++k) {
        const int64_t g = g0 + k * 32;
        float m[kGroup];
        mults.template get<kGroup>(g * kGroup, m);
        const float v[kGroup] = {f[k].x, f[k].y, f[k].z, f[k].w};
        uint32_t word = 0;
#pragma unroll
        for (int c = 0; c < kGroup; ++c) {
          bad += is_nonfinite(v[c]);
          const uint32_t code = static_cast<uint32_t>(quantize_code(v[c], m[c])) & 0xffu;
          word |= code << (8 * c);  // little endian: element c of the group is byte c
        }
        qv[g] = word;
      }
    }
  }
  for (int64_t i = tail + global_thread(); i < n; i += grid_threads()) {
    float m[1];
    mults.template get<1>(i, m);
    const float v = __ldg(x + i);
    bad += is_nonfinite(v);
    q[i] = static_cast<int8_t>(quantize_code(v, m[0]));
  }
  add_count(nonfinite, bad);
}

template <bool Vector, class Mults>
__global__ void __launch_bounds__(kThreads, 4)
    k_dequantize_int8(const int8_t *__restrict__ q, float *__restrict__ x, int64_t n, Mults mults) {
  int64_t tail = 0;
  if constexpr (Vector) {
    const int lane = threadIdx.x & 31;
    const int64_t tiles = n / kTile;
    const int64_t warps = grid_threads() >> 5;
    tail = tiles * kTile;
    const uint32_t *qv = reinterpret_cast<const uint32_t *>(q);
    float4 *xv = reinterpret_cast<float4 *>(x);
    for (int64_t t = global_thread() >> 5; t < tiles; t += warps) {
      const int64_t g0 = t * kTileGroups + lane;
      uint32_t w[kLoads];
#pragma unroll
      for (int k = 0; k < kLoads; ++k) w[k] = __ldg(qv + g0 + k * 32);
#pragma unroll
      for (int k = 0; k < kLoads; ++k) {
        const int64_t g = g0 + k * 32;
        float m[kGroup];
        mults.template get<kGroup>(g * kGroup, m);
        float v[kGroup];
#pragma unroll
        for (int c = 0; c < kGroup; ++c) {
          // Byte c of the word, sign-extended: shift it to the top, then arithmetic shift down.
          const int code = static_cast<int32_t>(w[k] << (24 - 8 * c)) >> 24;
          v[c] = dequantize_code(code, m[c]);
        }
        xv[g] = make_float4(v[0], v[1], v[2], v[3]);
      }
    }
  }
  for (int64_t i = tail + global_thread(); i < n; i += grid_threads()) {
    float m[1];
    mults.template get<1>(i, m);
    x[i] = dequantize_code(q[i], m[0]);
  }
}

// ------------------------------------------------------------------------------ launchers

// The vector path needs 16-byte aligned float32 and 4-byte aligned codes.
bool vector_ok(const float *x, const int8_t *q) {
  return aligned16(x) && (reinterpret_cast<uintptr_t>(q) & 3u) == 0;
}

template <class VectorMults, class ScalarMults>
cudaError_t launch_quantize_int8(const float *x, int8_t *q, int64_t n, VectorMults vector_mults,
                                 ScalarMults scalar_mults, uint64_t *nonfinite,
                                 cudaStream_t stream) {
  auto *counter = reinterpret_cast<unsigned long long *>(nonfinite);
  cudaError_t err = cudaMemsetAsync(counter, 0, sizeof(unsigned long long), stream);
  if (err != cudaSuccess || n == 0) return err;
  int blocks = 0;
  if (vector_ok(x, q)) {
    err = grid_blocks(n >= kTile ? n / kTile * 32 : n, &blocks);
    if (err != cudaSuccess) return err;
    k_quantize_int8<true><<<blocks, kThreads, 0, stream>>>(x, q, n, vector_mults, counter);
  } else {
    err = grid_blocks(n, &blocks);
    if (err != cudaSuccess) return err;
    k_quantize_int8<false><<<blocks, kThreads, 0, stream>>>(x, q, n, scalar_mults, counter);
  }
  return cudaGetLastError();
}

template <class VectorMults, class ScalarMults>
cudaError_t launch_dequantize_int8(const int8_t *q, float *x, int64_t n, VectorMults vector_mults,
                                   ScalarMults scalar_mults, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  int blocks = 0;
  cudaError_t err;
  if (vector_ok(x, q)) {
    err = grid_blocks(n >= kTile ? n / kTile * 32 : n, &blocks);
    if (err != cudaSuccess) return err;
    k_dequantize_int8<true><<<blocks, kThreads, 0, stream>>>(q, x, n, vector_mults);
  } else {
    err = grid_blocks(n, &blocks);
    if (err != cudaSuccess) return err;
    k_dequantize_int8<false><<<blocks, kThreads, 0, stream>>>(q, x, n, scalar_mults);
  }
  return cudaGetLastError();
}


}  // namespace
}  // namespace quantkit

using namespace quantkit;

// ------------------------------------------------------------------------- the C ABI

extern "C" {

QK_API int qk_abi_version(void) { return QK_ABI_VERSION; }

QK_API const char *qk_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

QK_API cudaError_t qk_device_count(int *count) {
  if (count == nullptr) return cudaErrorInvalidValue;
  *count = 0;
  return cudaGetDeviceCount(count);
}

QK_API cudaError_t qk_quantize_int8_f32(const float *x, int8_t *q, int64_t n,
                                        const float *inv_scale, uint64_t *nonfinite, int device,
                                        cudaStream_t stream) {
  if (n < 0 || inv_scale == nullptr || nonfinite == nullptr || (n > 0 && (!x || !q)))
    return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  const PerTensor mults{inv_scale};
  return launch_quantize_int8(x, q, n, mults, mults, nonfinite, stream);
}

QK_API cudaError_t qk_quantize_int8_per_channel_f32(const float *x, int8_t *q, int64_t outer,
                                                    int64_t channels, int64_t inner,
                                                    const float *inv_scale, uint64_t *nonfinite,
                                                    int device, cudaStream_t stream) {
  const int64_t n = channel_view_size(outer, channels, inner);
  if (n < 0 || inv_scale == nullptr || nonfinite == nullptr || (n > 0 && (!x || !q)))
    return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  const uint64_t c = static_cast<uint64_t>(channels), in = static_cast<uint64_t>(inner);
  const PerChannel<true> uniform{inv_scale, c, in};
  if (n > 0 && inner % kGroup == 0)
    return launch_quantize_int8(x, q, n, uniform, uniform, nonfinite, stream);
  return launch_quantize_int8(x, q, n, PerChannel<false>{inv_scale, c, in}, uniform, nonfinite,
                              stream);
}

QK_API cudaError_t qk_quantize_int8_blockwise_f32(const float *x, int8_t *q, int64_t n,
                                                  int64_t block_size, const float *inv_scale,
                                                  uint64_t *nonfinite, int device,
                                                  cudaStream_t stream) {
  if (n < 0 || !is_block_size(block_size) || inv_scale == nullptr || nonfinite == nullptr ||
      (n > 0 && (!x || !q)))
    return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  const PerBlock mults{inv_scale, log2_exact(block_size)};
  return launch_quantize_int8(x, q, n, mults, mults, nonfinite, stream);
}

QK_API cudaError_t qk_dequantize_int8_f32(const int8_t *q, float *x, int64_t n, const float *scale,
                                          int device, cudaStream_t stream) {
  if (n < 0 || scale == nullptr || (n > 0 && (!x || !q))) return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  const PerTensor mults{scale};
  return launch_dequantize_int8(q, x, n, mults, mults, stream);
}

QK_API cudaError_t qk_dequantize_int8_per_channel_f32(const int8_t *q, float *x, int64_t outer,
                                                      int64_t channels, int64_t inner,
                                                      const float *scale, int device,
                                                      cudaStream_t stream) {
  const int64_t n = channel_view_size(outer, channels, inner);
  if (n < 0 || scale == nullptr || (n > 0 && (!x || !q))) return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  const uint64_t c = static_cast<uint64_t>(channels), in = static_cast<uint64_t>(inner);
  const PerChannel<true> uniform{scale, c, in};
  if (n > 0 && inner % kGroup == 0)
    return launch_dequantize_int8(q, x, n, uniform, uniform, stream);
  return launch_dequantize_int8(q, x, n, PerChannel<false>{scale, c, in}, uniform, stream);
}

QK_API cudaError_t qk_dequantize_int8_blockwise_f32(const int8_t *q, float *x, int64_t n,
                                                    int64_t block_size, const float *scale,
                                                    int device, cudaStream_t stream) {
  if (n < 0 || !is_block_size(block_size) || scale == nullptr || (n > 0 && (!x || !q)))
    return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  const PerBlock mults{scale, log2_exact(block_size)};
  return launch_dequantize_int8(q, x, n, mults, mults, stream);
}

}  // extern "C"
