// A host (CPU) emulation of the small part of CUDA that csrc/*.cu uses, so the kernels' logic
// (indexing, tails, alignment paths, reductions, the arithmetic) can be tested without a GPU.
//
// `python3 csrc/build.py --emulate` compiles csrc/*.cu with g++ against this header (after turning
// each `kernel<<<grid, block, shared, stream>>>(args)` into an emulated launch) into a shared
// library with the same C ABI. Each block runs as blockDim.x std::threads; __syncthreads is a block
// barrier and __shfl_down_sync a warp barrier, so a kernel whose lanes disagree on those calls
// deadlocks here as it would misbehave on a GPU. What this cannot check: the hardware itself
// (memory coalescing, speed, real intrinsics, the driver). Float arithmetic is IEEE here too
// (compiled with -ffp-contract=off); __float2int_rn and friends are emulated below.
#pragma once

#include <barrier>
#include <cfenv>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

// ------------------------------------------------------------------------------ the runtime API

typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
} cudaError_t;
typedef void *cudaStream_t;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float4 {
  float x, y, z, w;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace qk_emu {
// The emulated device: a few SMs, so grids stay small and grid-stride loops take many steps.
constexpr int kSms = 1;
constexpr int kThreadsPerSm = 256;

struct Block;
struct Thread {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  Block *block = nullptr;
};
inline thread_local Thread self;

struct Warp {
  explicit Warp(int lanes) : barrier(lanes) {}
  std::barrier<> barrier;
  unsigned long long slots[32] = {};
};

struct Block {
  Block(int threads, size_t shared_bytes) : barrier(threads), shared(shared_bytes / 8 + 1) {
    for (int w = 0; w < (threads + 31) / 32; ++w) {
      const int lanes = threads - 32 * w < 32 ? threads - 32 * w : 32;
      warps.push_back(std::make_unique<Warp>(lanes));
    }
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<double> shared;
};

inline std::mutex atomic_mutex;

// Runs fn once per thread of the grid: blocks one after another, the threads of a block at once.
inline void launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t,
                   const std::function<void()> &fn) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block state(threads, shared_bytes);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            self.thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            self.block_idx = dim3(bx, by, bz);
            self.block_dim = block;
            self.grid_dim = grid;
            self.block = &state;
            fn();
          });
        }
        for (auto &th : pool) th.join();
      }
}

template <class T>
T *shared_memory() {
  return reinterpret_cast<T *>(self.block->shared.data());
}
}  // namespace qk_emu

#define threadIdx (qk_emu::self.thread_idx)
#define blockIdx (qk_emu::self.block_idx)
#define blockDim (qk_emu::self.block_dim)
#define gridDim (qk_emu::self.grid_dim)

inline void __syncthreads() { qk_emu::self.block->barrier.arrive_and_wait(); }

template <class T>
T __shfl_down_sync(unsigned, T v, int offset) {
  static_assert(sizeof(T) <= 8, "64-bit values at most");
  const int t = static_cast<int>(threadIdx.x);
  qk_emu::Warp &warp = *qk_emu::self.block->warps[t / 32];
  const int lane = t % 32;
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  warp.slots[lane] = bits;
  warp.barrier.arrive_and_wait();
  T out = v;
  if (lane + offset < 32) std::memcpy(&out, &warp.slots[lane + offset], sizeof(T));
  warp.barrier.arrive_and_wait();
  return out;
}

inline cudaError_t cudaGetDevice(int *device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int *count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? qk_emu::kSms : qk_emu::kThreadsPerSm;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *blocks, F, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void *p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char *cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "error";
}

// ------------------------------------------------------------------------------ device functions

template <class T>
inline T __ldg(const T *p) {
  return *p;
}
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
// Truncation toward zero, saturating; NaN gives 0, as cvt.rzi.s32.f32.
inline int __float2int_rz(float v) {
  if (std::isnan(v)) return 0;
  if (v >= 2147483648.0f) return std::numeric_limits<int>::max();
  if (v < -2147483648.0f) return std::numeric_limits<int>::min();
  return static_cast<int>(v);
}
inline double __dmul_rn(double a, double b) { return a * b; }
// Round half to even (the default rounding mode), saturating; NaN gives 0, as cvt.rni.s32.f32.
inline int __float2int_rn(float v) {
  if (std::isnan(v)) return 0;
  const float r = std::nearbyint(v);
  if (r >= 2147483648.0f) return std::numeric_limits<int>::max();
  if (r < -2147483648.0f) return std::numeric_limits<int>::min();
  return static_cast<int>(r);
}
inline long long __double2ll_rz(double v) {
  if (std::isnan(v)) return 0;
  if (v >= 9223372036854775808.0) return std::numeric_limits<long long>::max();
  if (v < -9223372036854775808.0) return std::numeric_limits<long long>::min();
  return static_cast<long long>(v);  // truncation toward zero
}
// fabsf, fminf, rintf: the C library's (rintf rounds half to even in the default rounding mode).

template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
  std::lock_guard<std::mutex> lock(qk_emu::atomic_mutex);
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline double atomicAdd(double *p, double v) {
  std::lock_guard<std::mutex> lock(qk_emu::atomic_mutex);
  const double old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicMax(unsigned *p, unsigned v) {
  std::lock_guard<std::mutex> lock(qk_emu::atomic_mutex);
  const unsigned old = *p;
  if (v > old) *p = v;
  return old;
}
