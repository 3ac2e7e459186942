"""XLA FFI handlers written in Python: XLA calls them with its own buffers, no copy either way.

``register(name, fn)`` registers ``fn(args, rets)`` as the CPU custom call target ``name`` (for
``jax.ffi.ffi_call``): ``args`` and ``rets`` are numpy arrays viewing XLA's operand and result
buffers, and ``fn`` writes its results into ``rets``. An exception ``fn`` raises becomes an
XLA_FFI_Error carrying its message (jax raises it as its runtime error); nothing escapes the
C callback.

The structs are those of jaxlib's ``xla/ffi/api/c_api.h`` (API version 0.3), declared with
ctypes; the handler is a ``ctypes.CFUNCTYPE``, which takes the GIL on whatever thread XLA calls it.

Large result buffers are advised to use huge pages before ``fn`` writes them, as numpy does for
its own large arrays: XLA's fresh buffers otherwise take one page fault per 4 KiB on first
write (16k faults for 64 MiB of gradients, 15-40% of a large loss call; measured).
"""
import ctypes
import mmap
import sys
import threading
import traceback

import jax
import numpy as np

from .errors import LossError

API_VERSION = (0, 3)    # the c_api.h these structs transcribe
_METADATA = 1           # XLA_FFI_Extension_Metadata
_EXECUTE = 3            # XLA_FFI_ExecutionStage_EXECUTE
_INVALID_ARGUMENT, _INTERNAL = 3, 13    # XLA_FFI_Error_Code
# XLA_FFI_DataType -> numpy (no bfloat16: the jax bridge computes half precision in float32)
_DTYPES = {k: np.dtype(v) for k, v in {
    1: np.bool_, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.uint8, 7: np.uint16,
    8: np.uint32, 9: np.uint64, 10: np.float16, 11: np.float32, 12: np.float64}.items()}

_p, _size, _i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64


class _Struct(ctypes.Structure):
    @classmethod
    def size_up_to(cls, last):
        """XLA_FFI_STRUCT_SIZE: the bytes up to and including field ``last``."""
        field = getattr(cls, last)
        return field.offset + field.size


class ExtensionBase(_Struct):
    _fields_ = [("struct_size", _size), ("type", ctypes.c_int), ("next", _p)]


class ApiVersion(_Struct):
    _fields_ = [("struct_size", _size), ("extension_start", _p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class Metadata(_Struct):
    _fields_ = [("struct_size", _size), ("api_version", ApiVersion), ("traits", ctypes.c_uint32),
                ("state_type_id", _i64)]


class MetadataExtension(_Struct):
    _fields_ = [("extension_base", ExtensionBase), ("metadata", ctypes.POINTER(Metadata))]


class Buffer(_Struct):
    _fields_ = [("struct_size", _size), ("extension_start", _p), ("dtype", ctypes.c_int),
                ("data", _p), ("rank", _i64), ("dims", ctypes.POINTER(_i64))]


class Args(_Struct):        # XLA_FFI_Args and XLA_FFI_Rets have one layout
    _fields_ = [("struct_size", _size), ("extension_start", _p), ("size", _i64),
                ("types", ctypes.POINTER(ctypes.c_int)), ("args", ctypes.POINTER(ctypes.POINTER(Buffer)))]


class Attrs(_Struct):
    _fields_ = [("struct_size", _size), ("extension_start", _p), ("size", _i64),
                ("types", _p), ("names", _p), ("attrs", _p)]


class ErrorCreateArgs(_Struct):
    _fields_ = [("struct_size", _size), ("extension_start", _p), ("message", ctypes.c_char_p),
                ("errc", ctypes.c_int)]


_ErrorCreate = ctypes.CFUNCTYPE(_p, ctypes.POINTER(ErrorCreateArgs))


class Api(_Struct):         # only the fields read here: the header's first function pointer
    _fields_ = [("struct_size", _size), ("extension_start", _p), ("api_version", ApiVersion),
                ("internal_api", _p), ("XLA_FFI_Error_Create", _ErrorCreate)]


class CallFrame(_Struct):
    _fields_ = [("struct_size", _size), ("extension_start", ctypes.POINTER(ExtensionBase)),
                ("api", ctypes.POINTER(Api)), ("ctx", _p), ("stage", ctypes.c_int),
                ("args", Args), ("rets", Args), ("attrs", Attrs), ("future", _p)]


_Handler = ctypes.CFUNCTYPE(_p, ctypes.POINTER(CallFrame))
_FRAME_SIZE = CallFrame.size_up_to("attrs")
_BUFFER_SIZE = Buffer.size_up_to("dims")


class FfiError(RuntimeError):
    """XLA handed a handler something these structs do not describe (a jaxlib this was not written for)."""


def _array(buf):
    """The numpy array viewing an XLA_FFI_Buffer (row-major: the layout ffi_call asks for by default)."""
    b = buf.contents
    if b.struct_size < _BUFFER_SIZE:
        raise FfiError(f"XLA_FFI_Buffer of {b.struct_size} bytes, expected at least {_BUFFER_SIZE}")
    dtype = _DTYPES.get(b.dtype)
    if dtype is None:
        raise FfiError(f"XLA_FFI_DataType {b.dtype} is not supported")
    shape = tuple(b.dims[:b.rank])
    n = dtype.itemsize
    for d in shape:
        n *= d
    if n == 0:
        return np.empty(shape, dtype)
    return np.frombuffer((ctypes.c_char * n).from_address(b.data), dtype).reshape(shape)


_HUGE = 1 << 22         # bytes from which numpy madvises huge pages (numpy/_core/src/multiarray/alloc.c)
_madvise = None
if sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE"):
    _madvise = ctypes.CDLL(None).madvise
    _madvise.argtypes, _madvise.restype = (_p, _size, ctypes.c_int), ctypes.c_int


def _result(buf):
    """A result buffer, advised to take huge pages when large (a hint: failure changes nothing)."""
    a = _array(buf)
    if _madvise is not None and a.nbytes >= _HUGE:
        start = -(-a.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
        _madvise(start, (a.ctypes.data + a.nbytes - start) // mmap.PAGESIZE * mmap.PAGESIZE, mmap.MADV_HUGEPAGE)
    return a


def _error(frame, code, message):
    """An XLA_FFI_Error made by XLA's own Error_Create (XLA owns and frees it)."""
    args = ErrorCreateArgs(ErrorCreateArgs.size_up_to("errc"), None, message.encode(errors="replace"), code)
    return frame.contents.api.contents.XLA_FFI_Error_Create(ctypes.byref(args))


def _metadata(frame):
    """Answer XLA's registration-time query: the API version these structs follow (or XLA's own
    when older: the fields read here are in every version), no traits, no state."""
    ext = ctypes.cast(frame.contents.extension_start, ctypes.POINTER(MetadataExtension)).contents
    if ext.extension_base.struct_size < MetadataExtension.size_up_to("metadata") or \
            ext.metadata.contents.struct_size < Metadata.size_up_to("traits"):
        return _error(frame, _INVALID_ARGUMENT, "lossdsl FFI handler: XLA_FFI_Metadata is smaller than expected")
    m = ext.metadata.contents
    xla = frame.contents.api.contents.api_version
    version = min(API_VERSION, (xla.major_version, xla.minor_version))
    m.api_version = ApiVersion(ApiVersion.size_up_to("minor_version"), None, *version)
    m.traits = 0
    if m.struct_size >= Metadata.size_up_to("state_type_id"):      # older XLAs have no such field
        m.state_type_id = 0     # XLA_FFI_UNKNOWN_TYPE_ID
    return None


def _handler(name, fn):
    def handle(frame):
        try:
            f = frame.contents
            if f.extension_start and f.extension_start.contents.type == _METADATA:
                return _metadata(frame)
            if f.struct_size < _FRAME_SIZE:
                raise FfiError(f"XLA_FFI_CallFrame of {f.struct_size} bytes, expected at least {_FRAME_SIZE}")
            if f.stage != _EXECUTE:
                raise FfiError(f"execution stage {f.stage}: only the execute stage is handled")
            args, rets = f.args, f.rets
            fn([_array(args.args[i]) for i in range(args.size)], [_result(rets.args[i]) for i in range(rets.size)])
            return None
        except LossError as e:
            return _error(frame, _INVALID_ARGUMENT, str(e))
        except BaseException as e:      # noqa: BLE001 - an exception must not cross the C frame
            return _error(frame, _INTERNAL, f"{name}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    return _Handler(handle)


_handlers = {}      # name -> the CFUNCTYPE: XLA holds only its address, which must stay valid
_lock = threading.Lock()


def register(name, fn):
    """Register ``fn(args, rets)`` as the CPU FFI target ``name`` (once per name)."""
    with _lock:
        if name in _handlers:
            return
        h = _handler(name, fn)
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(ctypes.cast(h, _p).value), platform="cpu")
        _handlers[name] = h
