"""Compiled loops that numpy and torch do not offer, built with the system C compiler at first use.

Bulyan's coordinate step sorts a few dozen values per coordinate, a million times: numpy pays a transposed copy and
a short sort per coordinate, about 3-6x the stack's Gram product. Here a sorting network runs down the selected
rows, many coordinates at once (SIMD min/max), on cache-sized column blocks read straight from the stack.

The source is a string in this module, so it travels wherever the Python code does (a Flower app bundle, a wheel).
The shared library is cached per source, compiler flags and CPU (`-march=native`) under $DITTO_KERNEL_CACHE (default
~/.cache/ditto-flower); a process that cannot build it (no compiler, a read-only cache) logs why once and the callers
use their numpy path, which gives the same numbers. DITTO_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import numpy as np

_LOG = logging.getLogger(__name__)

_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define W 64 /* columns per network pass: theta x 64 values stay in the L1 cache */

/* Per column c < ncols of x (row stride ld) over the `theta` rows `rows`: sort the values (the comparator network
   `pairs`), find the first and the last window of `beta` consecutive sorted values whose reach
   max(|o_a - m|, |o_(a+beta-1) - m|) around the median m is smallest, write the float64 mean of the first window
   (summed in sorted order) to out[c], and tied[c] = 1 where the two windows' far ends differ (the caller ranks
   those columns by their distances instead). The median and the reaches in the stack's precision, as numpy.
   Returns 0, or -1 where the work buffer cannot be allocated. */
#define BULYAN(NAME, T, ABS)                                                                                       \
int NAME(const T *x, int64_t ld, const int64_t *rows, int32_t theta, int64_t ncols, int32_t beta,                \
         const int32_t *pairs, int32_t npairs, double *out, uint8_t *tied) {                                       \
    T *buf = malloc(sizeof(T) * (size_t)theta * W);                                                                \
    if (buf == NULL) return -1;                                                                                    \
    T med[W], best[W];                                                                                             \
    int32_t first[W], last[W];                                                                                     \
    const int32_t k = theta / 2, windows = theta - beta + 1;                                                       \
    for (int64_t c0 = 0; c0 < ncols; c0 += W) {                                                                    \
        const int32_t w = (int32_t)(ncols - c0 < W ? ncols - c0 : W);                                              \
        for (int32_t t = 0; t < theta; t++) {                                                                      \
            memcpy(buf + t * W, x + rows[t] * ld + c0, (size_t)w * sizeof(T));                                     \
            for (int32_t c = w; c < W; c++) buf[t * W + c] = 0;                                                    \
        }                                                                                                          \
        for (int32_t p = 0; p < npairs; p++) {                                                                     \
            T *lo = buf + pairs[2 * p] * W, *hi = buf + pairs[2 * p + 1] * W;                                      \
            for (int32_t c = 0; c < W; c++) {                                                                      \
                const T a = lo[c], b = hi[c];                                                                      \
                lo[c] = b < a ? b : a;                                                                             \
                hi[c] = b < a ? a : b;                                                                             \
            }                                                                                                      \
        }                                                                                                          \
        for (int32_t c = 0; c < W; c++) {                                                                          \
            med[c] = theta % 2 ? buf[k * W + c] : (T)(buf[(k - 1) * W + c] + buf[k * W + c]) / (T)2;               \
            best[c] = (T)INFINITY;                                                                                 \
            first[c] = 0;                                                                                          \
            last[c] = 0;                                                                                           \
        }                                                                                                          \
        for (int32_t a = 0; a < windows; a++) {                                                                    \
            const T *left = buf + a * W, *right = buf + (a + beta - 1) * W;                                        \
            for (int32_t c = 0; c < W; c++) {                                                                      \
                const T dl = ABS(left[c] - med[c]), dr = ABS(right[c] - med[c]);                                   \
                const T r = dl < dr ? dr : dl;                                                                     \
                first[c] = r < best[c] ? a : first[c];                                                             \
                best[c] = r < best[c] ? r : best[c];                                                               \
                last[c] = r <= best[c] ? a : last[c];                                                              \
            }                                                                                                      \
        }                                                                                                          \
        for (int32_t c = 0; c < w; c++) {                                                                          \
            double sum = 0.0;                                                                                      \
            for (int32_t t = first[c]; t < first[c] + beta; t++) sum += (double)buf[t * W + c];                    \
            out[c0 + c] = sum / beta;                                                                              \
            tied[c0 + c] = first[c] != last[c] && buf[first[c] * W + c] != buf[(last[c] + beta - 1) * W + c];      \
        }                                                                                                          \
    }                                                                                                              \
    free(buf);                                                                                                     \
    return 0;                                                                                                      \
}

BULYAN(bulyan_coordinates_f32, float, fabsf)
BULYAN(bulyan_coordinates_f64, double, fabs)
"""


def _cpu() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _cache_dir() -> Path:
    root = os.environ.get("DITTO_KERNEL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "ditto-flower"


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (a second or so) and cached; None where they cannot be built or
    DITTO_KERNELS=0."""
    if os.environ.get("DITTO_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_FLAGS), str(compiler), _cpu()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    try:
        if not target.exists():
            if compiler is None:
                raise OSError("no C compiler (cc or gcc) on PATH; set CC to one")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                source, built = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
                source.write_text(_SOURCE)
                run = subprocess.run([compiler, *_FLAGS, "-o", str(built), str(source)], capture_output=True, text=True)
                if run.returncode != 0:
                    raise OSError(f"{compiler} failed: {run.stderr.strip()[:500]}")
                os.replace(built, target)  # atomic: processes building at once each install a whole library
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        _LOG.warning("compiled kernels unavailable (%s); using the numpy path, same results, slower", error)
        return None
    for name, ctype in (("bulyan_coordinates_f32", ctypes.c_float), ("bulyan_coordinates_f64", ctypes.c_double)):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.POINTER(ctype),
            ctypes.c_int64,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_int32,
            ctypes.c_int64,
            ctypes.c_int32,
            ctypes.POINTER(ctypes.c_int32),
            ctypes.c_int32,
            ctypes.POINTER(ctypes.c_double),
            ctypes.POINTER(ctypes.c_uint8),
        ]
    return lib


@cache
def sorting_network(n: int) -> np.ndarray:
    """Batcher's odd-even merge sort as (lower, upper) index pairs for n values: the network for the next power of
    two with every comparator that touches a padding position dropped (padding +inf never moves)."""
    size = 1 << max(0, (n - 1).bit_length())
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return np.array(pairs, dtype=np.int32).reshape(-1, 2)


def bulyan_coordinates(
    x: np.ndarray, rows: np.ndarray, beta: int, begin: int, end: int
) -> tuple[np.ndarray, np.ndarray]:
    """(float64 mean of the `beta` sorted values of x[rows, c] with the smallest reach around their median, tied
    flags) for the columns c in begin:end. x: a C-contiguous float32/float64 array without NaN; needs `library()`."""
    lib = library()
    if lib is None:
        raise RuntimeError("the compiled kernels are not available: check strategies.kernels.library() first")
    ctype, fn = (
        (ctypes.c_float, lib.bulyan_coordinates_f32)
        if x.dtype == np.float32
        else (ctypes.c_double, lib.bulyan_coordinates_f64)
    )
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    pairs = sorting_network(len(rows))
    out = np.empty(end - begin, dtype=np.float64)
    tied = np.empty(end - begin, dtype=np.uint8)
    status = fn(
        x[:, begin:].ctypes.data_as(ctypes.POINTER(ctype)),  # column `begin` of row 0; rows lie d elements apart
        x.shape[1],
        rows.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
        len(rows),
        end - begin,
        beta,
        pairs.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
        len(pairs),
        out.ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
        tied.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
    )
    if status != 0:
        raise MemoryError(f"bulyan_coordinates: no memory for a {len(rows)}-row work buffer")
    return out, tied.astype(bool)
