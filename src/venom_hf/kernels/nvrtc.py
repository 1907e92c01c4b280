"""Run-time compilation of the CUDA sources in ``csrc/`` with NVRTC (through cuda-python), a disk and
in-memory cache of the CUBINs, and kernel launch with ``cuLaunchKernel``.

* Compiles to CUBIN for the concrete ``sm_XX`` of the device (a CUBIN from a newer NVRTC loads on an
  older driver; PTX would not).
* Disk cache: ``$VENOM_HF_CACHE`` or ``$XDG_CACHE_HOME/venom_hf`` (default ``~/.cache/venom_hf``); key =
  sha256(source + headers + options + arch + NVRTC version + requested instances).
* The NVRTC log is shown in the exception on a compile error.
* Launch: on the given stream handle (the caller passes torch's current raw stream); nothing here
  synchronizes or allocates, so launches can be captured in CUDA graphs. ``Kernel.launch`` calls the
  driver's ``cuLaunchKernel`` through ctypes with a prebuilt argument array (``Kernel.bind``: the ctypes
  arguments converted once): a launch costs a few us of host time there, against ~10 us through
  cuda-python's argument marshalling (decode runs hundreds of launches per token, so this is a visible
  share of an eager decode step).

Nothing in this module imports torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

_LOCK = threading.RLock()


class NVRTCUnavailable(RuntimeError):
    pass


class CompileError(RuntimeError):
    pass


def _import_cuda():
    """(nvrtc, driver) modules of cuda-python, new (cuda.bindings, >= 12.6) or old layout."""
    try:
        from cuda.bindings import driver, nvrtc  # type: ignore

        return nvrtc, driver
    except ImportError:
        pass
    try:
        from cuda import cuda as driver  # type: ignore
        from cuda import nvrtc  # type: ignore

        return nvrtc, driver
    except ImportError as e:
        raise NVRTCUnavailable(
            "venom_hf's CUDA kernels need NVRTC through cuda-python: `pip install cuda-python "
            f"nvidia-cuda-nvrtc` (import failed: {e})"
        ) from e


def nvrtc_available() -> bool:
    try:
        nvrtc, _ = _import_cuda()
        err, _, _ = nvrtc.nvrtcVersion()
        return int(err) == 0
    except Exception:
        return False


def nvrtc_version() -> tuple[int, int]:
    nvrtc, _ = _import_cuda()
    err, major, minor = nvrtc.nvrtcVersion()
    if int(err) != 0:
        raise NVRTCUnavailable(f"nvrtcVersion failed: {err}")
    return int(major), int(minor)


def csrc_dir() -> Path:
    """Folder of the CUDA sources: $VENOM_HF_CSRC, the package's csrc/ (package data), or the repo's."""
    env = os.environ.get("VENOM_HF_CSRC")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent  # venom_hf/
    for cand in (here / "csrc", here.parent.parent / "csrc"):
        if (cand / "spatha.cuh").exists():
            return cand
    raise FileNotFoundError("venom_hf: cannot find the CUDA sources (csrc/spatha.cuh); set VENOM_HF_CSRC")


def cache_dir() -> Path:
    env = os.environ.get("VENOM_HF_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "venom_hf"


def _check_nvrtc(nvrtc, res, what, prog=None):
    err = res[0] if isinstance(res, tuple) else res
    if int(err) != 0:
        msg = f"NVRTC {what} failed: {err}"
        raise CompileError(msg)
    return res[1:] if isinstance(res, tuple) and len(res) > 1 else None


def _program_log(nvrtc, prog) -> str:
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    if int(err) != 0 or size <= 1:
        return ""
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.decode(errors="replace").rstrip("\x00").strip()


def compile_cubin(
    source: str,
    name_expressions: list[str],
    arch: str,
    options: list[str] | None = None,
    headers: dict[str, str] | None = None,
    filename: str = "spatha.cu",
) -> tuple[bytes, dict[str, str], str]:
    """Compile ``source`` to a CUBIN for ``arch`` (e.g. "sm_90"). Returns (cubin, {expr: lowered}, log)."""
    nvrtc, _ = _import_cuda()
    headers = headers or {}
    hnames = [k.encode() for k in headers]
    hsrcs = [v.encode() for v in headers.values()]
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), len(headers), hsrcs, hnames)
    if int(err) != 0:
        raise CompileError(f"nvrtcCreateProgram failed: {err}")
    try:
        for expr in name_expressions:
            _check_nvrtc(nvrtc, nvrtc.nvrtcAddNameExpression(prog, expr.encode()), f"AddNameExpression({expr})")
        opts = [f"--gpu-architecture={arch}", "--std=c++17", *(options or [])]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        log = _program_log(nvrtc, prog)
        if int(err) != 0:
            raise CompileError(f"NVRTC failed to compile {filename} for {arch} (options {opts}):\n{log}")
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        if int(err) != 0:
            raise CompileError(f"nvrtcGetCUBINSize failed: {err}")
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        if int(err) != 0:
            raise CompileError(f"nvrtcGetCUBIN failed: {err}")
        lowered = {}
        for expr in name_expressions:
            err, name = nvrtc.nvrtcGetLoweredName(prog, expr.encode())
            if int(err) != 0:
                raise CompileError(f"nvrtcGetLoweredName({expr}) failed: {err}")
            lowered[expr] = name.decode() if isinstance(name, bytes) else str(name)
        return bytes(cubin), lowered, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _source_and_headers() -> tuple[str, dict[str, str]]:
    d = csrc_dir()
    source = (d / "spatha.cu").read_text()
    headers = {"spatha.cuh": (d / "spatha.cuh").read_text()}
    return source, headers


def cached_cubin(name_expressions: list[str], arch: str, options: list[str] | None = None):
    """(cubin, lowered names), from the disk cache or freshly compiled (then stored)."""
    source, headers = _source_and_headers()
    options = list(options or [])
    ver = nvrtc_version()
    h = hashlib.sha256()
    for part in (source, *headers.keys(), *headers.values(), *options, arch, f"nvrtc{ver}", *name_expressions):
        h.update(part.encode())
        h.update(b"\0")
    key = h.hexdigest()[:32]
    d = cache_dir()
    cub_path, names_path = d / f"spatha-{arch}-{key}.cubin", d / f"spatha-{arch}-{key}.json"
    if cub_path.exists() and names_path.exists():
        try:
            lowered = json.loads(names_path.read_text())
            if set(lowered) == set(name_expressions):
                return cub_path.read_bytes(), lowered
        except Exception:
            pass
    cubin, lowered, _ = compile_cubin(source, name_expressions, arch, options, headers)
    try:
        d.mkdir(parents=True, exist_ok=True)
        for path, data in ((cub_path, cubin), (names_path, json.dumps(lowered).encode())):
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache dir only costs a recompile next time
    return cubin, lowered


# --------------------------------------------------------------------------------------------- driver
def _check_cu(driver, res, what):
    err = res[0] if isinstance(res, tuple) else res
    if int(err) != 0:
        try:
            _, s = driver.cuGetErrorString(err)
            s = s.decode() if isinstance(s, bytes) else s
        except Exception:
            s = ""
        raise RuntimeError(f"CUDA driver call {what} failed: {err} {s}")
    if isinstance(res, tuple):
        return res[1] if len(res) == 2 else res[1:]
    return None


class Kernel:
    """One function of a loaded module, launched with a single by-value struct argument (all our kernels
    take one params struct). ``launch(grid, block, smem, stream, args)``: ``args`` is the address of a
    ``void*[1]`` array holding the struct's address (``kernel_args(struct)``); the driver copies the
    struct at the call, so the caller may change and reuse it right after."""

    __slots__ = ("expr", "function", "handle", "_driver", "_smem", "_max_smem")

    def __init__(self, expr: str, function, driver, max_smem: int):
        self.expr, self.function, self._driver = expr, function, driver
        self.handle = int(function)  # the raw CUfunction, for the ctypes launch
        self._smem = 48 * 1024
        self._max_smem = max_smem

    def reserve_smem(self, smem: int) -> None:
        """Allow ``smem`` bytes of dynamic shared memory (> 48 KB needs an opt-in per function)."""
        if smem <= self._smem:
            return
        if smem > self._max_smem:
            raise RuntimeError(f"kernel {self.expr} needs {smem} B of shared memory, the device allows {self._max_smem}")
        driver = self._driver
        _check_cu(driver, driver.cuFuncSetAttribute(
            self.function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
            "cuFuncSetAttribute(max dynamic smem)")
        self._smem = smem

    def launch(self, grid, block, smem: int, stream: int, args: int) -> None:
        if smem > self._smem:
            self.reserve_smem(smem)
        raw = _raw_launch()
        if raw is not None:
            err = raw(self.handle, grid[0], grid[1], grid[2], block[0], block[1], block[2], smem, stream, args, None)
            if err:
                driver = self._driver
                _check_cu(driver, (driver.CUresult(err),), f"cuLaunchKernel({self.expr})")
            return
        driver = self._driver
        _check_cu(driver, driver.cuLaunchKernel(self.function, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                                smem, driver.CUstream(stream), args, 0), f"cuLaunchKernel({self.expr})")

    def bind(self, grid, block, smem: int, args: int):
        """``launch`` with everything but the stream fixed: ``fn(stream)``. The ctypes arguments are
        converted once per stream handle instead of at every call (~1-3 us of an eager launch's host time;
        the launch plans of ``kernels.ops`` launch through these)."""
        self.reserve_smem(smem)
        raw = _raw_launch_unconverted()
        if raw is None:
            return lambda stream: self.launch(grid, block, smem, stream, args)
        head = (ctypes.c_void_p(self.handle), *(ctypes.c_uint(int(n)) for n in (*grid, *block, smem)))
        tail = (ctypes.c_void_p(args), ctypes.c_void_p(None))
        by_stream: dict[int, tuple] = {}

        def launch(stream: int) -> None:
            a = by_stream.get(stream)
            if a is None:
                if len(by_stream) >= 64:  # streams come and go: start over rather than grow
                    by_stream.clear()
                a = by_stream[stream] = (*head, ctypes.c_void_p(stream), *tail)
            err = raw(*a)
            if err:
                driver = self._driver
                _check_cu(driver, (driver.CUresult(err),), f"cuLaunchKernel({self.expr})")

        return launch


def kernel_args(param_struct) -> tuple[int, object]:
    """(address of a void*[1] holding ``param_struct``'s address, the array to keep alive)."""
    arr = (ctypes.c_void_p * 1)(ctypes.addressof(param_struct))
    return ctypes.addressof(arr), arr


def _raw_launch():
    """libcuda's cuLaunchKernel through ctypes (None where libcuda cannot be opened by name: then the
    cuda-python binding is used)."""
    return _libcuda_fn("cuLaunchKernel", [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3)


def _raw_launch_unconverted():
    """libcuda's cuLaunchKernel through ctypes with no argtypes: the caller passes ctypes objects (made once),
    so nothing is converted at the call. None where libcuda cannot be opened by name."""
    return _libcuda_fn("cuLaunchKernel", None)


# CUtensorMap enums (cuda.h): data types, swizzle modes (by span in bytes), the 256-byte L2 promotion
TMAP_UINT8, TMAP_UINT16, TMAP_UINT32 = 0, 1, 2
TMAP_SWIZZLE = {0: 0, 32: 1, 64: 2, 128: 3}
_TMAP_L2_PROMOTION_256B = 3


def _encode_tiled():
    return _libcuda_fn("cuTensorMapEncodeTiled", [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32] + [ctypes.c_void_p] * 5
                       + [ctypes.c_int] * 4)


def tensor_maps_available() -> bool:
    """Whether TMA descriptors can be encoded here (libcuda's cuTensorMapEncodeTiled opens through ctypes)."""
    return _encode_tiled() is not None


def encode_tensor_map_2d(out_words, data_type: int, address: int, dims: tuple[int, int], row_stride: int,
                         box: tuple[int, int], swizzle: int = 0) -> None:
    """Encode a 2-D tiled TMA descriptor (CUtensorMap, 128 bytes) into ``out_words`` (a ctypes array of
    16 uint64) with libcuda's cuTensorMapEncodeTiled: ``dims`` = (elements per row, rows), ``row_stride`` in
    bytes (multiple of 16), ``box`` = (elements, rows) per copy, ``swizzle`` the shared-memory swizzle span
    in bytes (0, 32, 64, 128; at least the box row's bytes); no interleave, out-of-bounds elements read as
    zero."""
    fn = _encode_tiled()
    if fn is None:
        raise RuntimeError("venom_hf: libcuda's cuTensorMapEncodeTiled is not reachable through ctypes")
    dims64 = (ctypes.c_uint64 * 2)(*dims)
    strides64 = (ctypes.c_uint64 * 1)(row_stride)
    box32 = (ctypes.c_uint32 * 2)(*box)
    elem32 = (ctypes.c_uint32 * 2)(1, 1)
    err = fn(ctypes.addressof(out_words), data_type, 2, address, ctypes.addressof(dims64),
             ctypes.addressof(strides64), ctypes.addressof(box32), ctypes.addressof(elem32), 0, TMAP_SWIZZLE[swizzle],
             _TMAP_L2_PROMOTION_256B, 0)
    if err:
        _, driver = _import_cuda()
        _check_cu(driver, (driver.CUresult(err),), f"cuTensorMapEncodeTiled(dims={dims}, box={box})")


_LIBCUDA_FNS: dict[tuple[str, bool], object] = {}


def _libcuda_fn(name: str, argtypes: list | None):
    """A function of libcuda through ctypes (``argtypes``, restype int), or None. ``argtypes`` None: a
    function object of its own with no argument conversion (its callers pass ctypes objects)."""
    key = (name, argtypes is None)
    if key not in _LIBCUDA_FNS:
        fn = None
        for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
            try:
                fn = getattr(ctypes.CDLL(lib), name)  # a new CDLL, so a function object of its own
                break
            except (OSError, AttributeError):
                continue
        if fn is not None:
            if argtypes is not None:
                fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        _LIBCUDA_FNS[key] = fn
    return _LIBCUDA_FNS[key]


def _ensure_context(driver, device_index: int):
    _check_cu(driver, driver.cuInit(0), "cuInit")
    ctx = _check_cu(driver, driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if ctx is None or int(ctx) == 0:
        dev = _check_cu(driver, driver.cuDeviceGet(device_index), "cuDeviceGet")
        ctx = _check_cu(driver, driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _check_cu(driver, driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def alloc_bytes(n: int, device_index: int) -> int:
    """``n`` bytes of device memory straight from the driver, outside torch's allocator and every CUDA-graph
    pool (for derived weight layouts that live as long as the weight; see ``free``). Not during capture."""
    _, driver = _import_cuda()
    _ensure_context(driver, device_index)
    return int(_check_cu(driver, driver.cuMemAlloc(max(n, 16)), "cuMemAlloc"))


def free(ptr: int) -> None:
    """Give back memory from ``alloc_bytes`` (waits for the work that may still read it)."""
    _, driver = _import_cuda()
    _check_cu(driver, driver.cuCtxSynchronize(), "cuCtxSynchronize")
    _check_cu(driver, driver.cuMemFree(ptr), "cuMemFree")


def copy_async(dst: int, src: int, n: int, stream: int) -> None:
    """Device-to-device copy of ``n`` bytes on ``stream`` (a raw CUstream handle)."""
    _, driver = _import_cuda()
    _check_cu(driver, driver.cuMemcpyDtoDAsync(dst, src, n, stream), "cuMemcpyDtoDAsync")


def alloc_zeroed_words(n: int, device_index: int) -> int:
    """Device memory of ``n`` 32-bit words, zeroed and synchronized, straight from the driver (never freed).
    For state that outlives any one call, such as the split-K arrival counters: memory from torch's caching
    allocator taken while a CUDA graph is captured (or while torch.compile's cudagraph trees warm up)
    belongs to the graph's pool, which refuses tensors that live on after the graph; driver memory is
    outside every pool. Not allowed during stream capture (the driver refuses allocations then)."""
    _, driver = _import_cuda()
    _ensure_context(driver, device_index)
    ptr = _check_cu(driver, driver.cuMemAlloc(4 * n), "cuMemAlloc")
    _check_cu(driver, driver.cuMemsetD32(ptr, 0, n), "cuMemsetD32")
    _check_cu(driver, driver.cuCtxSynchronize(), "cuCtxSynchronize")  # zero before any stream uses it
    return int(ptr)


class Module:
    """A loaded CUBIN on one device: ``kernel(expr)`` gives a launchable ``Kernel``."""

    def __init__(self, cubin: bytes, lowered: dict[str, str], device_index: int):
        _, driver = _import_cuda()
        self._driver = driver
        _ensure_context(driver, device_index)
        self._cubin = cubin  # keep alive
        self.module = _check_cu(driver, driver.cuModuleLoadData(cubin), "cuModuleLoadData")
        dev = _check_cu(driver, driver.cuDeviceGet(device_index), "cuDeviceGet")
        self.max_smem = int(
            _check_cu(
                driver,
                driver.cuDeviceGetAttribute(
                    driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev
                ),
                "cuDeviceGetAttribute",
            )
        )
        self.kernels: dict[str, Kernel] = {}
        for expr, name in lowered.items():
            f = _check_cu(driver, driver.cuModuleGetFunction(self.module, name.encode()), f"cuModuleGetFunction({expr})")
            self.kernels[expr] = Kernel(expr, f, driver, self.max_smem)

    def kernel(self, expr: str) -> Kernel:
        return self.kernels[expr]

    def launch(self, expr: str, grid, block, smem: int, stream: int, param_struct) -> None:
        """One launch with a params struct (tests and one-off calls; the SpMM plans use ``Kernel``)."""
        args, keep = kernel_args(param_struct)
        self.kernels[expr].launch(grid, block, smem, stream, args)
        del keep


_MODULES: dict[tuple, Module] = {}


def get_module(name_expressions: list[str], arch: str, device_index: int, options: list[str] | None = None) -> Module:
    key = (tuple(name_expressions), arch, device_index, tuple(options or ()))
    mod = _MODULES.get(key)
    if mod is None:
        with _LOCK:
            mod = _MODULES.get(key)
            if mod is None:
                cubin, lowered = cached_cubin(name_expressions, arch, options)
                mod = Module(cubin, lowered, device_index)
                _MODULES[key] = mod
    return mod
