"""Constants shared by every backend (mirrored in csrc/quantkit.h; a test checks both agree)."""

#: Largest int8 code magnitude. Symmetric narrow range: codes lie in [-QMAX, QMAX], never -128.
QMAX = 127

#: Smallest and largest block sizes for blockwise quantization (powers of two).
MIN_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 4096
