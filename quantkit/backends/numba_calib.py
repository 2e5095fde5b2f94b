"""The numba kernels of calibration in one namespace, for quantkit.calibration (which takes them
as a module), quantkit.report, the tests and the benchmarks. Each kernel lives in the module of
its job:

* numba_stats: |x|max, the log histogram, the one-pass scans, the sample, the linear histogram;
* numba_sse: the exact error sums of data at given alphas (fixed point, float32 search, float64);
* numba_small_search: the exact search of small arrays, rows and blocks;
* numba_histogram_model: the histogram model and its minimum;
* numba_entropy: the KL threshold;
* numba_error_sums: the error-sum primitives below all of them.
"""

from .._constants import CHUNK, HIST_BINS, HIST_SHIFT  # noqa: F401
from .numba_entropy import entropy_threshold  # noqa: F401
from .numba_error_sums import scale_inv, search_unit, sse_search, unit_inverse  # noqa: F401
from .numba_histogram_model import (count_moments, histogram_moments, model_minima,  # noqa: F401
                                    model_search, model_sse, model_sse_many, model_tables,
                                    pile_bins)
from .numba_small_search import (LATTICE_MAX_DISTINCT, nonzero_abs, search_mse,  # noqa: F401
                                 search_mse_blocks, search_mse_discrete, search_mse_rows,
                                 search_mse_values)
from .numba_sse import (sse_chunked_many, sse_f64_many, sse_f64_rows, sse_fixed,  # noqa: F401
                        sse_fixed_many, sse_search_bound, sse_search_weighted)
from .numba_stats import (SAMPLE_PIECE, absmax_flat, absmax_rows, bin_values,  # noqa: F401
                          histogram_linear, histogram_log, sample_pieces, scan_flat, scan_tail)
