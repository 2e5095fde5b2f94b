"""Constants shared by every backend (mirrored in csrc/quantkit.h; a test checks both agree)."""

#: Largest int8 code magnitude. Symmetric narrow range: codes lie in [-QMAX, QMAX], never -128.
QMAX = 127

#: Smallest and largest block sizes for blockwise quantization (powers of two).
MIN_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 4096

#: Smallest positive alpha: below it ``float32(127 / alpha)`` overflows float32. alpha is either 0 or
#: at least this (float32(127) / FLT_MAX, rounded up to float32).
MIN_POSITIVE_ALPHA = 3.7321948e-37

#: Largest alpha: one float32 step below FLT_MAX. At FLT_MAX itself float32(alpha / 127) rounds up
#: and code 127 dequantizes to inf, so quantize refuses it and calibrate caps its alphas here (only
#: data whose max |x| is FLT_MAX reaches it).
MAX_ALPHA = 3.4028233e38

#: Log histogram of |x| (numba and CUDA): bin = (float32 bits of |x|) >> HIST_SHIFT, the exponent and
#: the top 7 mantissa bits; every finite float32 has a bin below HIST_BINS.
HIST_SHIFT = 16
HIST_BINS = 255 << 7

#: Elements per chunk of the parallel numba kernels (one task's share, kept in cache).
CHUNK = 1 << 16
