// The 8-bit AdamW step (docs/DESIGN.md section 7; reference: quantkit/reference.py adamw8bit_step;
// the CPU kernel: quantkit/backends/numba_optim.py). Bit-identical to both.
//
// Per element (reference.adamw8bit_update): m' = (+-mag_m) * f32(beta1 * unit_m) + (1 - beta1) * g,
// v' = mag_r^2 * f32(f32(unit_r^2) * beta2) + (1 - beta2) * g^2, r' = sqrt(v'),
// p' = p * decay - (m' * r_step_size) / (r' + r_eps), with unit = absmax / top per block.
//
// One CUDA block of kThreads threads per quantization block (blocks lie within one row of the
// (rows, L) view; the last block of a row takes the remainder, so it holds up to
// 2 * block_size - 1 values), grid-stride over the blocks. Two passes over a block, each thread
// on the same elements in both:
//   1. the code magnitudes of m and r = sqrt(v) times the block's factors (computed once per
//      block), update them and p, write p, and reduce the block's new max |m| and max r (integer
//      maxima of the float bits: the values are finite and non-negative once the sign is cleared);
//   2. update again (the same operations on the same inputs give the same bits; the
//      old codes are still in place because each thread rewrites only its own elements), scale by
//      top / absmax and encode to the nearest magnitude (ties to even in the linear run, up above).
// No buffer of the block's moments is needed, so any block size up to QK_MAX_BLOCK_SIZE works.
// Every float32 operation is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn,
// __fsqrt_rn): nothing is contracted into an FMA.
#include <cmath>

#include "common.cuh"

namespace quantkit {
namespace {

// A code map (reference.moment_magnitudes): `levels` magnitudes, `mbits` mantissa bits.
struct CodeMap {
  int per;          // 2**mbits: indices per binade
  int shift;        // 23 - mbits
  int offset;       // (127 + e_min) << 23: bits of index `per` minus (0 << shift)
  int e_min;
  int mbits;
  int top_index;    // levels - 1
  float step;       // 2**(e_min - mbits): the linear run's spacing
  float top;        // the largest magnitude
  float smallest;   // 2**e_min: the smallest normal magnitude
  float mult;       // 2**(mbits - e_min): y * mult counts linear steps (exact)
};

// The map's constants, as numba_optim._code_constants computes them (host side).
inline CodeMap code_map(int levels, int mbits) {
  CodeMap c;
  c.per = 1 << mbits;
  c.shift = 23 - mbits;
  c.e_min = 1 - (levels / c.per - 1);
  c.offset = (127 + c.e_min) << 23;
  c.mbits = mbits;
  c.top_index = levels - 1;
  c.step = std::ldexp(1.0f, c.e_min - mbits);
  c.top = levels >= 2 * c.per ? static_cast<float>(1.0 + (c.per - 1) / static_cast<double>(c.per))
                              : static_cast<float>(levels - 1) * c.step;
  c.smallest = std::ldexp(1.0f, c.e_min);
  c.mult = std::ldexp(1.0f, mbits - c.e_min);
  return c;
}

inline bool valid_code_map(int levels, int mbits) {
  return mbits >= 1 && mbits <= 8 && levels >= 2 && levels <= 256 && levels % (1 << mbits) == 0
         && 127 + (1 - (levels / (1 << mbits) - 1)) >= 1;
}

// The magnitude of index k (reference.moment_magnitudes), exact in float32.
__device__ __forceinline__ float magnitude(int k, CodeMap c) {
  return k < c.per ? __fmul_rn(static_cast<float>(k), c.step)
                   : __uint_as_float(static_cast<unsigned>(((k - c.per) << c.shift) + c.offset));
}

// Index of the magnitude nearest to y >= 0 (finite): in the linear run the exact y * mult
// rounded to nearest, ties to even; above it ties to the larger (numba_optim's rule).
__device__ __forceinline__ int encode_index(float y, CodeMap c) {
  int k;
  if (y < c.smallest) {
    k = __float2int_rn(__fmul_rn(y, c.mult));
  } else {
    const int bits = static_cast<int>(__float_as_uint(y));
    k = ((bits + (1 << (c.shift - 1))) >> c.shift) - ((127 + c.e_min) << c.mbits) + c.per;
  }
  return min(k, c.top_index);
}

// reference.ADAMW_SCALARS, in that order.
struct Scalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt, r_eps,
      r_step_size;
};

inline Scalars read_scalars(const float *v) {
  return Scalars{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]};
}

// One element's 8-bit update (reference.adamw8bit_update): the signed magnitude of m's code and
// the magnitude of r's code with the block's factors in, the new m, r and p out.
__device__ __forceinline__ void adamw8bit_update(float g, float m_mag, float m_factor,
                                                 float r_mag, float v_factor, float &m, float &r,
                                                 float &p, Scalars s) {
  m = __fadd_rn(__fmul_rn(m_mag, m_factor), __fmul_rn(s.one_minus_beta1, g));
  const float v = __fadd_rn(__fmul_rn(__fmul_rn(r_mag, r_mag), v_factor),
                            __fmul_rn(s.one_minus_beta2, __fmul_rn(g, g)));
  r = __fsqrt_rn(v);
  p = __fsub_rn(__fmul_rn(p, s.decay),
                __fdiv_rn(__fmul_rn(m, s.r_step_size), __fadd_rn(r, s.r_eps)));
}

// One element's float32-state update (reference.adamw_update): m, r in, the new m, r, p out.
__device__ __forceinline__ void adamw_update(float g, float &m, float &r, float &p,
                                             Scalars s) {
  m = __fadd_rn(__fmul_rn(s.beta1, m), __fmul_rn(s.one_minus_beta1, g));
  const float v = __fadd_rn(__fmul_rn(s.beta2, __fmul_rn(r, r)),
                            __fmul_rn(s.one_minus_beta2, __fmul_rn(g, g)));
  r = __fsqrt_rn(v);
  const float denom = __fadd_rn(__fdiv_rn(r, s.bc2_sqrt), s.eps);
  p = __fsub_rn(__fmul_rn(p, s.decay), __fmul_rn(s.step_size, __fdiv_rn(m, denom)));
}

// The block's maximum of `mine` over its threads, returned to every thread. `slots` holds
// kThreads / 32 entries of shared memory.
__device__ __forceinline__ uint32_t block_max(uint32_t mine, uint32_t *slots) {
  const uint32_t warp = warp_max(mine);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (lane == 0) slots[w] = warp;
  __syncthreads();
  uint32_t top = 0;
  for (int i = 0; i < kThreads / 32; ++i) top = max(top, slots[i]);
  __syncthreads();
  return top;
}

// No __launch_bounds__: with it ptxas for sm_90 keeps 32 registers and spills; without, 38.
__global__ void adamw8bit_kernel(float *__restrict__ p, const float *__restrict__ g,
                                 int8_t *__restrict__ m_codes, float *__restrict__ m_absmax,
                                 uint8_t *__restrict__ r_codes, float *__restrict__ r_absmax,
                                 int64_t rows, int64_t length, int64_t block_size, CodeMap mc,
                                 CodeMap rc, Scalars s) {
  extern __shared__ uint32_t shared[];
  const int64_t per_row = length / block_size > 0 ? length / block_size : 1;
  const int64_t n_blocks = rows * per_row;
  for (int64_t blk = blockIdx.x; blk < n_blocks; blk += gridDim.x) {
    const int64_t row = blk / per_row, b = blk - row * per_row;
    const int64_t lo = b * block_size;
    const int64_t hi = b == per_row - 1 ? length : lo + block_size;
    const int64_t base = row * length;
    // the blocks' factors: beta1 * unit_m, unit_r^2 * beta2 (unit = reference.decode_unit)
    const float m_factor = __fmul_rn(s.beta1, __fdiv_rn(m_absmax[row * per_row + b], mc.top));
    const float r_unit = __fdiv_rn(r_absmax[row * per_row + b], rc.top);
    const float v_factor = __fmul_rn(__fmul_rn(r_unit, r_unit), s.beta2);
    uint32_t m_top = 0, r_top = 0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      const int c = m_codes[base + i];
      const float t = magnitude(c < 0 ? -c : c, mc);
      float m, r, pi = p[base + i];
      adamw8bit_update(g[base + i], c < 0 ? -t : t, m_factor, magnitude(r_codes[base + i], rc),
                       v_factor, m, r, pi, s);
      p[base + i] = pi;
      m_top = max(m_top, __float_as_uint(m) & 0x7fffffffu);
      r_top = max(r_top, __float_as_uint(r));
    }
    const float m_max = __uint_as_float(block_max(m_top, shared));
    const float r_max = __uint_as_float(block_max(r_top, shared));
    const float m_inv = m_max > 0.0f ? __fdiv_rn(mc.top, m_max) : 0.0f;
    const float r_inv = r_max > 0.0f ? __fdiv_rn(rc.top, r_max) : 0.0f;
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      const int c = m_codes[base + i];
      const float t = magnitude(c < 0 ? -c : c, mc);
      float m, r, unused = 0.0f;
      adamw8bit_update(g[base + i], c < 0 ? -t : t, m_factor, magnitude(r_codes[base + i], rc),
                       v_factor, m, r, unused, s);
      const float ym = __fmul_rn(m, m_inv);
      const int k = encode_index(ym < 0.0f ? -ym : ym, mc);
      m_codes[base + i] = static_cast<int8_t>(ym < 0.0f ? -k : k);
      r_codes[base + i] = static_cast<uint8_t>(encode_index(__fmul_rn(r, r_inv), rc));
    }
    if (threadIdx.x == 0) {
      m_absmax[row * per_row + b] = m_max;
      r_absmax[row * per_row + b] = r_max;
    }
    __syncthreads();
  }
}

// AdamW with float32 moments m and r = sqrt(v) (numba_optim.adamw32_step), grid-stride.
__global__ void __launch_bounds__(kThreads)
    adamw32_kernel(float *__restrict__ p, const float *__restrict__ g, float *__restrict__ m,
                   float *__restrict__ r, int64_t n, Scalars s) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    float mi = m[i], ri = r[i], pi = p[i];
    adamw_update(g[i], mi, ri, pi, s);
    p[i] = pi;
    m[i] = mi;
    r[i] = ri;
  }
}

}  // namespace
}  // namespace quantkit

using namespace quantkit;

extern "C" {

QK_API cudaError_t qk_adamw8bit_step_f32(float *p, const float *g, int8_t *m_codes,
                                         float *m_absmax, uint8_t *r_codes, float *r_absmax,
                                         int64_t rows, int64_t length, int64_t block_size,
                                         int m_levels, int m_mbits, int r_levels, int r_mbits,
                                         const float *scalars, int device, cudaStream_t stream) {
  if (rows < 0 || length < 0 || !is_block_size(block_size) || scalars == nullptr
      || !valid_code_map(m_levels, m_mbits) || !valid_code_map(r_levels, r_mbits))
    return cudaErrorInvalidValue;
  if (rows == 0 || length == 0) return cudaSuccess;
  if (!p || !g || !m_codes || !m_absmax || !r_codes || !r_absmax) return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  const Scalars s = read_scalars(scalars);
  const int64_t per_row = length / block_size > 0 ? length / block_size : 1;
  const int64_t n_blocks = rows * per_row;
  const int grid = static_cast<int>(n_blocks < (int64_t{1} << 20) ? n_blocks : int64_t{1} << 20);
  const CodeMap mc = code_map(m_levels, m_mbits), rc = code_map(r_levels, r_mbits);
  const size_t shared = (kThreads / 32) * sizeof(uint32_t);
  adamw8bit_kernel<<<grid, kThreads, shared, stream>>>(p, g, m_codes, m_absmax, r_codes,
                                                       r_absmax, rows, length, block_size, mc,
                                                       rc, s);
  return cudaGetLastError();
}

QK_API cudaError_t qk_adamw32_step_f32(float *p, const float *g, float *m, float *r, int64_t n,
                                       const float *scalars, int device, cudaStream_t stream) {
  if (n < 0 || scalars == nullptr) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (!p || !g || !m || !r) return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  const Scalars s = read_scalars(scalars);
  int blocks = 0;
  const cudaError_t err = grid_blocks(n, &blocks);
  if (err != cudaSuccess) return err;
  adamw32_kernel<<<blocks, kThreads, 0, stream>>>(p, g, m, r, n, s);
  return cudaGetLastError();
}

}  // extern "C"
