"""Small C kernels, compiled at first use; PyTorch is the fallback and the reference.

vdkl.c, the Sparse VD KL:
The KL touches every weight on every step with four transcendental functions; as ~20 separate PyTorch
elementwise kernels it was the largest cost of a CPU distillation epoch. One vectorized C loop computes the
value and both gradients (already times the term's loss weight) in a single pass, on torch's OpenMP threads
where the compiler supports -fopenmp (vdkl.c says why that runtime), as many as torch.get_num_threads():
~1.05 ms on one thread, ~0.55 ms on two, for the 500x784 layer. Needs a C compiler (cc/gcc); without one, or
with VARSTUDENT_NO_KERNELS=1, the PyTorch path runs and results agree to float32 rounding. Its `vd_step` and
`vd_step_grads` are the two passes over a LinearSVD layer's weights of a whole CPU training step: sigma^2, the
KL and its derivative (and the train_clip mask) before the matrix products, the KL's gradient added into the
data gradients after them (variational.py, _LinearVDStep); `vd_step` skips the KL's functions for blocks of
weights all at the upper clip of log alpha, most of a sparse layer's. Under train_clip, once a layer keeps few
of its weights, `keep_count`, `keep_index`, `kept_matmul` and `kept_grad` compute the mean's two products over
the kept ones alone.

blockmax.c, the BSR's l1/l_inf term of a layer (losses.py): the block maxima of |w|, the term and its
sparse gradient's coordinates in one call on the OpenMP threads, instead of NumPy's argmax and argmin and
~35 small PyTorch ops and autograd nodes a layer; same gradient to the bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("varstudent")
COMPILE_FLAGS = ["-O3", "-march=native", "-fPIC"]
FLOAT32_MAX = 3.4028234663852886e38
# (compile, link) flags tried in order: OpenMP threads and glibc's vector math (its vector expf/logf are called
# only under -ffast-math), then each dropped where the toolchain lacks it. Compiled and linked in two steps:
# gcc < 13 links -ffast-math shared objects with crtfastmath.o, whose constructor turns on flush-to-zero for
# the whole process the moment the library is loaded - the link step never sees -ffast-math.
BUILDS = ((["-ffast-math", "-fopenmp"], ["-fopenmp", "-lmvec"]), (["-ffast-math"], ["-lmvec"]),
          (["-fopenmp"], ["-fopenmp"]), ([], []))


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "varstudent" / "kernels"


def _cpu_key() -> str:
    """-march=native binaries belong to one CPU model: key the cache by it and the compiler."""
    try:
        cpu = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    return f"{platform.machine()} {cpu}"


@cache
def _library(name: str) -> ctypes.CDLL | None:
    """nn/<name>.c compiled and loaded, or None when kernels are off or it cannot be built here."""
    if os.environ.get("VARSTUDENT_NO_KERNELS") == "1":
        return None
    source = Path(__file__).with_name(f"{name}.c")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not source.is_file():
        log.info("no C compiler found: %s runs in PyTorch (slower on the CPU)", name)
        return None
    key = hashlib.sha256(source.read_bytes() + repr((COMPILE_FLAGS, BUILDS)).encode() + _cpu_key().encode()
                         + compiler.encode()).hexdigest()[:16]
    lib_path = _cache_dir() / f"{name}-{key}.so"
    try:
        if not lib_path.is_file():
            compile_library(source, compiler, lib_path)
        return ctypes.CDLL(str(lib_path))
    except OSError as exc:
        log.info("could not build the %s kernel (%s): it runs in PyTorch", name, exc)
        return None


def compile_library(source: Path, compiler: str, lib_path: Path) -> None:
    """source compiled into the shared library lib_path with the first of BUILDS the toolchain takes; OSError
    when none does."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
        obj, lib = Path(tmp) / "kernel.o", Path(tmp) / "kernel.so"
        for compile_extra, link_extra in BUILDS:
            compiled = subprocess.run([compiler, *COMPILE_FLAGS, *compile_extra, "-c", str(source), "-o", str(obj)],
                                      capture_output=True)
            if compiled.returncode == 0 and subprocess.run(
                    [compiler, "-shared", str(obj), "-o", str(lib), "-lm", *link_extra],
                    capture_output=True).returncode == 0:
                break
        else:
            raise OSError(f"{compiler} could not build {source.name}: {compiled.stderr.decode()[-300:]}")
        os.replace(lib, lib_path)  # atomic: concurrent first uses never load half a file


def _function(library: str, name: str, restype, argtypes: list):
    """A C function of nn/<library>.c with its ctypes signature, or None where the library is not built."""
    lib = _library(library)
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


@cache
def vdkl_kernel():
    """The compiled `vd_kl` function, or None when kernels are off or cannot be built here."""
    return _function("vdkl", "vd_kl", ctypes.c_double,
                     [ctypes.c_void_p] * 4 + [ctypes.c_long] + [ctypes.c_float] * 3 + [ctypes.c_int])


@cache
def vd_step_kernel():
    """The compiled `vd_step` and `vd_step_grads` functions (vdkl.c) as a pair, or None when kernels are off or
    cannot be built here."""
    lib = _library("vdkl")
    return None if lib is None else step_functions(lib)


def step_functions(lib: ctypes.CDLL) -> tuple:
    """`vd_step` and `vd_step_grads` of a loaded vdkl library, with their ctypes signatures."""
    step, grads = lib.vd_step, lib.vd_step_grads
    step.restype = ctypes.c_double
    step.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] + [ctypes.c_float] * 3 + [ctypes.c_int]
    grads.restype, grads.argtypes = None, [ctypes.c_void_p] * 6 + [ctypes.c_long, ctypes.c_float, ctypes.c_int]
    return step, grads


def vd_step(weight: torch.Tensor, log_sigma2: torch.Tensor, clip: float, grad_below: float,
            threshold: float | None, with_kl: bool = True) -> tuple[float, torch.Tensor, torch.Tensor | None,
                                                                    torch.Tensor | None, torch.Tensor | None]:
    """One pass before a LinearSVD training forward (vdkl.c): (summed KL, sigma^2, dKL/dlog alpha unscaled and
    zero where no gradient passes, kept weights, keep mask); the KL 0.0 and its derivative None without
    with_kl, the last two None without a train_clip threshold. Contiguous float32 CPU tensors, and only where
    `vd_step_kernel()` is not None."""
    sigma2 = torch.empty_like(weight)
    dkl = torch.empty_like(weight) if with_kl else None
    masked = torch.empty_like(weight) if threshold is not None else None
    keep = torch.empty(weight.shape, dtype=torch.bool) if threshold is not None else None
    kl = vd_step_kernel()[0](weight.data_ptr(), log_sigma2.data_ptr(), sigma2.data_ptr(), _pointer(dkl),
                             _pointer(masked), _pointer(keep), weight.numel(), clip, _finite(grad_below),
                             _finite(threshold if threshold is not None else math.inf), torch.get_num_threads())
    return kl, sigma2, dkl, masked, keep


def vd_step_grads(grad_w: torch.Tensor | None, grad_log_sigma2: torch.Tensor | None, weight: torch.Tensor,
                  sigma2: torch.Tensor, dkl: torch.Tensor | None, keep: torch.Tensor | None, kl_scale: float) -> None:
    """In place, after a LinearSVD training backward's products (vdkl.c): grad_log_sigma2 = itself * sigma^2
    (+ kl_scale * dkl); grad_w (+= kl_scale * dKL/dw), then zero where `keep` is False. Contiguous float32 CPU
    tensors (either gradient, dkl and keep may be None), and only where `vd_step_kernel()` is not None."""
    vd_step_kernel()[1](_pointer(grad_w), _pointer(grad_log_sigma2), weight.data_ptr(), sigma2.data_ptr(),
                        _pointer(dkl), _pointer(keep), weight.numel(), kl_scale, torch.get_num_threads())


@cache
def kept_products_kernel():
    """The compiled `keep_count`, `keep_index`, `kept_matmul`, `kept_grad` and `transpose` functions (vdkl.c), or
    None when kernels are off or cannot be built here."""
    count = _function("vdkl", "keep_count", ctypes.c_long,
                      [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_int])
    index = _function("vdkl", "keep_index", None,
                      [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int])
    matmul = _function("vdkl", "kept_matmul", None, [ctypes.c_void_p] * 6 + [ctypes.c_long] * 3 + [ctypes.c_int])
    grad = _function("vdkl", "kept_grad", None, [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int])
    transpose = _function("vdkl", "transpose", None, [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2 + [ctypes.c_int])
    functions = (count, index, matmul, grad, transpose)
    return None if any(f is None for f in functions) else functions


def keep_index(keep: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The kept entries of a 2-D bool mask, row by row, as (start (rows + 1,) int64, col_index (kept,) int32):
    row i's column indices are col_index[start[i]:start[i + 1]]; None where more than `limit` entries are kept
    (then only counted). Contiguous CPU mask, and only where `kept_products_kernel()` is not None."""
    rows, cols = keep.shape
    threads = torch.get_num_threads()
    start = torch.zeros(rows + 1, dtype=torch.int64)
    total = kept_products_kernel()[0](keep.data_ptr(), rows, cols, start[1:].data_ptr(), threads)
    if total > limit:
        return None
    torch.cumsum(start, 0, out=start)
    col_index = torch.empty(total, dtype=torch.int32)
    kept_products_kernel()[1](keep.data_ptr(), rows, cols, start.data_ptr(), col_index.data_ptr(), threads)
    return start, col_index


def transposed(matrix: torch.Tensor) -> torch.Tensor:
    """matrix^T as a new contiguous tensor, for a contiguous 2-D float32 CPU matrix (else torch's copy)."""
    if not (matrix.is_contiguous() and matrix.dtype == torch.float32 and matrix.dim() == 2):
        return matrix.t().contiguous()
    out = torch.empty(matrix.shape[1], matrix.shape[0], dtype=matrix.dtype)
    kept_products_kernel()[4](matrix.data_ptr(), out.data_ptr(), *matrix.shape, torch.get_num_threads())
    return out


def kept_matmul(x_t: torch.Tensor, weight: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor],
                bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight at the kept entries only, bias) from x_t = x^T (contiguous): (batch, out), computed
    over the kept entries `index` (keep_index) alone. Contiguous float32 CPU tensors."""
    rows, cols = weight.shape
    batch = x_t.shape[1]
    out_t = torch.empty(rows, batch, dtype=weight.dtype)
    kept_products_kernel()[2](x_t.data_ptr(), weight.data_ptr(), index[0].data_ptr(), index[1].data_ptr(),
                              _pointer(bias), out_t.data_ptr(), rows, cols, batch, torch.get_num_threads())
    return transposed(out_t)


def kept_grad(grad: torch.Tensor, x_t: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor],
              shape: torch.Size) -> torch.Tensor:
    """grad^T x at the kept entries `index` (keep_index), 0 elsewhere, of a weight of `shape`; x_t = x^T
    (contiguous). Float32 CPU tensors."""
    rows, cols = shape
    grad_t = transposed(grad)
    grad_w = torch.empty(rows, cols, dtype=grad.dtype)
    kept_products_kernel()[3](grad_t.data_ptr(), x_t.data_ptr(), index[0].data_ptr(), index[1].data_ptr(),
                              grad_w.data_ptr(), rows, cols, x_t.shape[1], torch.get_num_threads())
    return grad_w


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return tensor.data_ptr() if tensor is not None else None


def _finite(bound: float) -> float:
    """An open bound (math.inf) as float32's largest value: the kernels are built with -ffast-math, whose
    -ffinite-math-only lets the compiler assume no infinity ever reaches them."""
    return min(bound, FLOAT32_MAX)


@cache
def bsr_linf_kernel():
    """The compiled `bsr_linf` function, or None when kernels are off or cannot be built here."""
    return _function("blockmax", "bsr_linf", ctypes.c_double,
                     [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                      ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 3 + [ctypes.c_int])


def bsr_linf(blocks: torch.Tensor, teacher_max: torch.Tensor, shape: torch.Size,
             dim: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One layer's l1/l_inf BSR term by the C kernel (blockmax.c says what is computed), with the sparse
    gradient's coordinates and coefficients: (term, indices (len(shape), blocks), coef (blocks,)).

    blocks: the student weight as contiguous float32 (blocks, rest), block m being index m of `dim` of a
    weight of `shape`; teacher_max: contiguous float32, one entry per block of the stacked pair (>= blocks).
    Only where `bsr_linf_kernel()` is not None.
    """
    rows, cols = blocks.shape
    if not (cols > 0 and dim in (0, 1) and teacher_max.numel() >= rows and blocks.is_contiguous()
            and teacher_max.is_contiguous() and blocks.dtype == teacher_max.dtype == torch.float32):
        raise ValueError(f"bsr_linf: {tuple(blocks.shape)} {blocks.dtype} blocks along dim {dim} against "
                         f"{teacher_max.numel()} teacher blocks: needs contiguous float32, >= 1 column, dim 0 or 1")
    indices = torch.empty(len(shape), rows, dtype=torch.long)
    coef = torch.empty(rows, dtype=torch.float32)
    student_max = torch.empty(rows, dtype=torch.float32)  # the kernel's scratch: |w| of each block's winner
    dims = (ctypes.c_long * len(shape))(*shape)
    term = bsr_linf_kernel()(blocks.data_ptr(), rows, cols, teacher_max.data_ptr(), teacher_max.numel(),
                             len(shape), dims, dim, indices.data_ptr(), coef.data_ptr(), student_max.data_ptr(),
                             torch.get_num_threads())
    return term, indices, coef


def vd_kl(weight: torch.Tensor, log_sigma2: torch.Tensor, clip: float, scale: float,
          with_grad: bool, grad_below: float = math.inf) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
    """(summed KL, scale * dKL/dweight, scale * dKL/dlog_sigma2) by the C kernel, the gradients None without
    with_grad, and zero where log alpha >= grad_below. Contiguous float32 CPU tensors, and only where
    `vdkl_kernel()` is not None."""
    grad_w = torch.empty_like(weight) if with_grad else None
    grad_s = torch.empty_like(log_sigma2) if with_grad else None
    kl = vdkl_kernel()(weight.data_ptr(), log_sigma2.data_ptr(), _pointer(grad_w), _pointer(grad_s),
                       weight.numel(), clip, _finite(grad_below), scale, torch.get_num_threads())
    return kl, grad_w, grad_s
