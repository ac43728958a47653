"""Compiled loops that numpy and torch do not offer, built with the system C compiler at first use.

Bulyan's coordinate step sorts a few dozen values per coordinate, a million times: numpy pays a transposed copy and
a short sort per coordinate, about 3-6x the stack's Gram product. Here a sorting network runs down the selected
rows, many coordinates at once (SIMD min/max), on cache-sized column blocks read straight from the stack.

The Gram kernels give Krum, Multi-Krum and Bulyan their bounded distances (`strategies/rules/distances.py`) at about
0.7x the time of torch's float32 GEMM: the symmetric half, in registers, with float64 taking over after 32 products.

The source is a string in a Python module (kernels_source.py), so it travels wherever the Python code does (a Flower
app bundle, a wheel).
The shared library is cached per source, compiler flags and CPU (`-march=native`) in $DITTO_KERNEL_CACHE (default
$XDG_CACHE_HOME/ditto-flower, else ~/.cache/ditto-flower); $CC names the compiler (default cc, else gcc). A process
that cannot build it (no compiler, a failed build, a read-only cache) logs why once and the callers take their
torch and numpy path: the same selections (and for float32 stacks the same Bulyan coordinates), slower.
DITTO_KERNELS=0 (or false, no, off) turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from strategies.rules.kernels_source import SOURCE

_LOG = logging.getLogger(__name__)

_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC"]  # a * b + c may fuse: bounds allow it

_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64  # pointers go as addresses (`_call`)
_SIGNATURES = {  # argument types of the C functions
    "gram": (_P, _I64, _I64, _I64, _P, _P),
    "direct": (_P, _I64, _I64, _I64, _P, _I32, _P),
    "rows": (_P, _I64, _I64, _I64, _P, _P, _I32, _P, _P),
    "bulyan": (_P, _I64, _P, _I32, _I64, _I32, _P, _I32, _P, _P),
}
_FUNCTIONS = {
    "gram_f32": "gram",
    "gram_f64_from_f32": "gram",
    "gram_f64_from_f64": "gram",
    "direct_rows_f32": "direct",
    "direct_rows_f64": "direct",
    "gram_rows_f32": "rows",
    "gram_rows_f64": "rows",
    "bulyan_coordinates_f32": "bulyan",
    "bulyan_coordinates_f64": "bulyan",
}


def _cpu() -> str:
    """What -march=native compiles for: the CPU's model and features (x86: model name, flags; ARM: implementer,
    part, features)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")
    return platform.machine() + "\n" + "\n".join(sorted({line for line in lines if line.startswith(keys)}))


def _cache_dir() -> Path:
    if os.environ.get("DITTO_KERNEL_CACHE"):
        return Path(os.environ["DITTO_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ditto-flower"


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (a second or so) and cached; None where they cannot be built or
    DITTO_KERNELS turns them off. A process decides once."""
    if os.environ.get("DITTO_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        _LOG.info("compiled kernels off (DITTO_KERNELS); using torch and numpy")
        return None
    compiler = shlex.split(os.environ.get("CC") or "") or [shutil.which("cc") or shutil.which("gcc") or ""]
    key = hashlib.sha256("\0".join([SOURCE, " ".join(_FLAGS), *compiler, _cpu()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    try:
        if not target.exists():
            if not compiler[0]:
                raise OSError("no C compiler (cc or gcc) on PATH; set CC to one")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                source, built = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
                source.write_text(SOURCE)
                command = [*compiler, *_FLAGS, "-o", str(built), str(source)]
                run = subprocess.run(command, capture_output=True, text=True, timeout=300)
                if run.returncode != 0:
                    raise OSError(f"{' '.join(compiler)} failed: {run.stderr.strip()[:500]}")
                os.replace(built, target)  # atomic: processes building at once each install a whole library
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        _LOG.warning("compiled kernels unavailable (%s); using torch and numpy: same selections, slower", error)
        return None
    for name, signature in _FUNCTIONS.items():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = list(_SIGNATURES[signature])
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


_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)  # ctypes calls release the GIL


def _column_ranges(d: int, threads: int, multiple: int) -> list[tuple[int, int]]:
    """Up to `threads` column ranges cut at multiples of `multiple` columns, each at least 16 of them."""
    parts = max(1, min(threads, d // (16 * multiple)))
    step = -(-d // parts // multiple) * multiple
    return [(start, min(start + step, d)) for start in range(0, d, step)]


def _summed(ranges: list[tuple[int, int]], work: Callable[[int, int], Any]) -> Any:
    """The sum of work(start, end) over the column ranges (an array, or a tuple of arrays added element by element),
    run on the pool where there are several and added in range order: the result depends on the ranges only."""
    parts = [work(*ranges[0])] if len(ranges) == 1 else list(_POOL.map(lambda r: work(*r), ranges))
    total = parts[0]
    for part in parts[1:]:
        total = tuple(a + b for a, b in zip(total, part)) if isinstance(total, tuple) else total + part
    return total


def _call(fn: Any, what: str, *args: Any) -> None:
    """Call a kernel: an array goes as the address of its first element (a view's: x[:, start:] points at column
    start of row 0), None as NULL; a kernel that could not allocate its buffers returns nonzero."""
    if fn(*(a.ctypes.data if isinstance(a, np.ndarray) else a for a in args)) != 0:
        raise MemoryError(f"{what}: no memory for its work buffers")


def _needed(x: np.ndarray, name: str, dtypes: tuple = (np.float32, np.float64)) -> ctypes.CDLL:
    """The library, after checking that x is what the C code reads: a C-contiguous 2-d array of one of `dtypes`."""
    lib = library()
    if lib is None:
        raise RuntimeError("the compiled kernels are not available: check strategies.rules.kernels.library() first")
    if x.ndim != 2 or not x.flags.c_contiguous or x.dtype not in dtypes or 0 in x.shape:
        raise ValueError(
            f"{name} reads a non-empty C-contiguous 2-d array of {'/'.join(np.dtype(t).name for t in dtypes)} "
            f"(got {x.dtype}, shape {x.shape}, C-contiguous: {x.flags.c_contiguous}): np.ascontiguousarray it"
        )
    return lib


def _check_rows(rows: np.ndarray, n: int, name: str) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= n)):
        raise ValueError(f"{name}: row indices must be a 1-d array in 0..{n - 1} (got {rows.tolist()[:10]})")
    return rows


def _check_centre(centre: np.ndarray | None, x: np.ndarray, name: str) -> np.ndarray | None:
    if centre is None:
        return None
    centre = np.ascontiguousarray(centre, dtype=x.dtype)
    if centre.shape != (x.shape[1],):
        raise ValueError(f"{name}: the centre needs {x.shape[1]} values, one per column (got shape {centre.shape})")
    return centre


LANES_BUDGET = 256 << 20  # bytes of float64 lanes (64 n^2 per column range) the symmetric Grams may hold at once


def _lanes_bytes(n: int) -> int:
    """Bytes of float64 lanes a symmetric Gram of n rows holds per column range: 8 per pair of 4-row-tiled rows."""
    return 64 * (-(-n // 4) * 4) ** 2


def gram_fits(n: int) -> bool:
    """Whether `gram_f32` / `gram_f64` can take n rows within LANES_BUDGET (n up to about 2,000); else torch's."""
    return _lanes_bytes(n) <= LANES_BUDGET


def _gram_ranges(n: int, d: int, threads: int, multiple: int) -> list[tuple[int, int]]:
    """Column ranges for a symmetric Gram: no more at once than LANES_BUDGET holds."""
    if not gram_fits(n):
        raise ValueError(f"a symmetric Gram of {n} rows needs more than {LANES_BUDGET >> 20} MiB: use torch's")
    return _column_ranges(d, max(1, min(threads, LANES_BUDGET // _lanes_bytes(n))), multiple)


def bulyan_coordinates(
    x: np.ndarray, rows: np.ndarray, beta: int, begin: int, end: int
) -> tuple[np.ndarray, np.ndarray]:
    """(float64 mean of the `beta` sorted values of x[rows, c] with the smallest reach around their median, tied
    flags) for the columns c in begin:end. x: a C-contiguous float32/float64 array without NaN."""
    lib = _needed(x, "bulyan_coordinates")
    fn = lib.bulyan_coordinates_f32 if x.dtype == np.float32 else lib.bulyan_coordinates_f64
    rows = _check_rows(rows, x.shape[0], "bulyan_coordinates")
    if not (1 <= beta <= len(rows)) or not (0 <= begin <= end <= x.shape[1]):
        raise ValueError(
            f"bulyan_coordinates: needs 1 <= beta <= rows and 0 <= begin <= end <= d (got beta {beta}, "
            f"{len(rows)} rows, columns {begin}:{end} of {x.shape[1]})"
        )
    pairs = sorting_network(len(rows))
    out = np.empty(end - begin, dtype=np.float64)
    tied = np.empty(end - begin, dtype=np.uint8)
    _call(
        fn,
        "bulyan_coordinates",
        x[:, begin:],
        x.shape[1],
        rows,
        len(rows),
        end - begin,
        beta,
        pairs,
        len(pairs),
        out,
        tied,
    )
    return out, tied.astype(bool)


def gram_rows(
    x: np.ndarray, centre: np.ndarray | None, rows: np.ndarray, threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(G[rows, :], squared norms of every row) of y = x - centre in float64, in one pass over the stack read as it
    is (no float64 copy), `threads` column ranges at once. x: a C-contiguous float32/float64 n x d array; centre:
    None (zero) or d values of x's dtype. Every entry is a float64 sum of d products (within gamma_d)."""
    lib = _needed(x, "gram_rows")
    fn = lib.gram_rows_f32 if x.dtype == np.float32 else lib.gram_rows_f64
    n, d = x.shape
    rows = _check_rows(rows, n, "gram_rows")
    centre = _check_centre(centre, x, "gram_rows")

    def work(start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        out, sq = np.empty((len(rows), n), dtype=np.float64), np.empty(n, dtype=np.float64)
        window = None if centre is None else centre[start:]
        _call(fn, "gram_rows", x[:, start:], n, end - start, d, window, rows, len(rows), out, sq)
        return out, sq

    return _summed(_column_ranges(d, threads, 1024), work)


DIRECT_RANGE = 1 << 16  # columns per parallel range of `direct_rows`: fixed, so the sum order never depends on threads


def direct_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared distances from `rows` to every row of a C-contiguous float32/float64 x by direct differences in
    float64 (the brute-force value), summed in an order that depends on the columns only: d_ij and d_ji agree bit
    for bit, whatever `rows` is and however many threads run."""
    lib = _needed(x, "direct_rows")
    fn = lib.direct_rows_f32 if x.dtype == np.float32 else lib.direct_rows_f64
    n, d = x.shape
    rows = _check_rows(rows, n, "direct_rows")

    def work(start: int, end: int) -> np.ndarray:
        out = np.empty((len(rows), n), dtype=np.float64)
        _call(fn, "direct_rows", x[:, start:], n, end - start, d, rows, len(rows), out)
        return out

    return _summed([(start, min(start + DIRECT_RANGE, d)) for start in range(0, d, DIRECT_RANGE)], work)


GRAM_LANE_TERMS = 32  # products each float32 lane of `gram_f32` sums before float64 takes over (BC / 16)
GRAM_BLOCK = 512  # columns per block of `gram_f32` (BC): each adds 16 float64 terms per pair


def gram_f32(x: np.ndarray, centre: np.ndarray | None, threads: int = 1) -> tuple[np.ndarray, int]:
    """(the n x n Gram matrix of y = fl32(x - centre) in float64, the count of float64 terms summed per entry) for a
    C-contiguous float32 x, symmetric, from float32 products summed GRAM_LANE_TERMS at a time in float32 and then
    in float64: within gamma_32 (u = 2^-24) + gamma_terms (u = 2^-53) of sum |y_ik y_jk|, at about 0.7x the time of
    torch's float32 x @ x.T on as many threads (half the products, in registers)."""
    lib = _needed(x, "gram_f32", (np.float32,))
    n, d = x.shape
    centre = _check_centre(centre, x, "gram_f32")

    def work(start: int, end: int) -> np.ndarray:
        out = np.empty((n, n), dtype=np.float64)
        _call(
            lib.gram_f32, "gram_f32", x[:, start:], n, end - start, d, None if centre is None else centre[start:], out
        )
        return out

    ranges = _gram_ranges(n, d, threads, GRAM_BLOCK)
    # 16 lane sums per block and range, all added in float64 (within a range, then the ranges in order)
    terms = sum(16 * -(-(end - start) // GRAM_BLOCK) for start, end in ranges)
    return _summed(ranges, work), terms


def gram_f64(x: np.ndarray, centre: np.ndarray | None, threads: int = 1) -> np.ndarray:
    """The n x n Gram matrix of y = x - centre in float64 for a C-contiguous float32 or float64 x (centre: None or
    d values of x's dtype), symmetric: float64 sums of d products, within gamma_d of sum |y_ik y_jk|, at about half
    the time of torch's float64 GEMM over float64 copies of the blocks."""
    lib = _needed(x, "gram_f64")
    fn = lib.gram_f64_from_f32 if x.dtype == np.float32 else lib.gram_f64_from_f64
    n, d = x.shape
    centre = _check_centre(centre, x, "gram_f64")

    def work(start: int, end: int) -> np.ndarray:
        out = np.empty((n, n), dtype=np.float64)
        _call(fn, "gram_f64", x[:, start:], n, end - start, d, None if centre is None else centre[start:], out)
        return out

    return _summed(_gram_ranges(n, d, threads, 256), work)
