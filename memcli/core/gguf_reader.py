"""Reading GGUF files (header, metadata and tensor table: fast, no per-element objects, every size checked
against the file) and the outtypes memcli writes tensors in.

Outtypes: adapters are small, so f32 (the default) is the exact choice. With F16 or Q8_0 weights llama.cpp also
rounds the activations it multiplies them with (to F16, to 8-bit blocks), which on the random test adapters cost
~1e-2 (f16) and ~0.3 (q8_0) in log-probability, against ~1e-4 for f32.

Imports nothing from memcli but errors: memcli.core.models imports this module.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memcli.core.errors import UserError

OUTTYPES = ("f32", "f16", "q8_0")


# --- outtypes ------------------------------------------------------------------------------------------------

def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got '{outtype}'")
    return outtype


def encode(array: np.ndarray, outtype: str, *, keep_f32: bool = False):
    """(data, raw_dtype) for GGUFWriter.add_tensor. 1-D tensors stay F32 (as every llama.cpp converter keeps
    them); Q8_0 needs rows that are whole 32-blocks, others fall back to F16."""
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if outtype == "f32" or keep_f32 or array.ndim < 2:
        return array, None
    if outtype == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def file_type(outtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


# --- reading -------------------------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order (ne): the row length first
    type: int  # GGMLQuantizationType value
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFMeta:
    path: Path
    kv: dict
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    def get(self, key, default=None):
        return self.kv.get(key, default)

    def array(self, name: str) -> np.ndarray:
        """The values of an F32/F16 tensor as a numpy array (numpy shape = reversed ggml shape)."""
        t = self.tensors[name]
        dtype = {0: np.float32, 1: np.float16}.get(t.type)
        if dtype is None:
            raise ValueError(f"tensor {name} is quantised")
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            data = np.frombuffer(f.read(t.nbytes), dtype=dtype)
        return data.reshape(tuple(reversed(t.shape)))


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def raw_string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string past the end of the file")
        s = self.buf[self.pos: self.pos + n]
        self.pos += n
        return s

    def string(self) -> str:
        return self.raw_string().decode("utf-8", "surrogateescape")

    def value(self, vtype: int, raw_strings: bool):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.raw_string() if raw_strings else self.string()
        if vtype == 9:
            sub, n = self.take("<I"), self.take("<Q")
            if sub in _NUMPY:
                width = np.dtype(_NUMPY[sub]).itemsize
                if self.pos + n * width > len(self.buf):
                    raise struct.error("array past the end of the file")
                values = np.frombuffer(self.buf, dtype=_NUMPY[sub], count=n, offset=self.pos).copy()
                self.pos += n * width
                return values.astype(bool) if sub == 7 else values
            if sub == 8:
                return [self.raw_string() if raw_strings else self.string() for _ in range(n)]
            return [self.value(sub, raw_strings) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf(path: str | os.PathLike, what: str = "GGUF file") -> GGUFMeta:
    """The metadata and tensor table of a GGUF file. Token strings are kept as bytes. UserError when the file is
    missing, not GGUF, corrupt or truncated."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    size = path.stat().st_size
    if size < 24:
        raise UserError(f"{what} {path} is not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise UserError(f"{what} {path} is not a GGUF file")
        try:
            cur = _Cursor(buf)
            cur.pos = 4
            version = cur.take("<I")
            if version not in (2, 3):
                raise UserError(f"{what} {path}: unsupported GGUF version {version}")
            n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
            if n_tensors > size or n_kv > size:
                raise ValueError("implausible counts")
            kv = {}
            for _ in range(n_kv):
                key = cur.string()
                vtype = cur.take("<I")
                kv[key] = cur.value(vtype, raw_strings=key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
            infos = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.take("<I")
                if n_dims > 8:
                    raise ValueError("implausible tensor rank")
                shape = tuple(cur.take("<Q") for _ in range(n_dims))
                infos.append((name, shape, cur.take("<I"), cur.take("<Q")))
            align = int(kv.get("general.alignment", 32))
            start = -(-cur.pos // align) * align
        except UserError:
            raise
        except (struct.error, ValueError, OverflowError, UnicodeDecodeError, MemoryError) as e:
            raise UserError(f"{what} {path} is corrupt or truncated ({e})") from None
    meta = GGUFMeta(path, kv)
    for name, shape, ttype, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise UserError(f"{what} {path} is corrupt: tensor {name} has unknown type {ttype}") from None
        nbytes = math.prod(shape) // block * type_size
        if start + offset + nbytes > size:
            raise UserError(f"{what} {path} is truncated: tensor {name} ends at byte {start + offset + nbytes:,}, "
                            f"the file has {size:,}")
        meta.tensors[name] = GGUFTensor(name, shape, ttype, start + offset, nbytes)
    return meta

