"""MXNet-compatible indexed RecordIO (``.rec`` + ``.idx``), without MXNet.

insightface datasets (MS1M, Glint360k, WebFace...) ship as MXNet ``MXIndexedRecordIO`` files. MXNet is
retired, so this module reads and writes the same bytes itself. The format (dmlc-core ``recordio.cc``, as
used by MXNet 1.9.1) is, per record::

    uint32 magic = 0xced7230a | uint32 lrec = cflag << 29 | length | payload chunk | zero pad to 4 bytes

all little-endian. A payload that contains the magic word at a 4-byte aligned offset is split there by the
writer (the magic itself is dropped and re-inserted by the reader), so that a reader that lost its place can
resync on the magic; ``cflag`` says whether a chunk is a whole record (0), or the start (1), a middle (2) or
the end (3) of a split one. Only the final chunk is padded; intermediate chunks are multiples of 4 by
construction. The ``.idx`` file is text, one ``key\\toffset\\n`` line per record in write order.

A record's payload is usually ``pack(IRHeader, image_bytes)``: a 24-byte ``<IfQQ`` header (flag, label, id,
id2); when ``flag > 0``, ``flag`` float32 labels follow the header and the header's label field is 0.

Readers memory-map the ``.rec`` file and re-map it lazily in every process that uses them, so one reader
object can be built in the main process and used by forked DataLoader workers.
"""
from __future__ import annotations

import errno
import math
import mmap
import numbers
import os
import struct
from collections import namedtuple
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = [
    "MAGIC",
    "IRHeader",
    "pack",
    "unpack",
    "encode_record",
    "RecordIOReader",
    "RecordIOWriter",
    "read_insightface_layout",
    "InsightFaceRecord",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC = struct.Struct("<II")
_LEN_MASK = (1 << 29) - 1
_MAX_CHUNK = 1 << 29  # the length field has 29 bits

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
_IR_FORMAT = struct.Struct("<IfQQ")
_IR_SIZE = _IR_FORMAT.size  # 24


# ----------------------------------------------------------------------------------------------------------
# IRHeader packing (mxnet.recordio.pack / unpack)


def pack(header: Sequence[Any], payload: bytes) -> bytes:
    """Prepend an IRHeader to ``payload`` like ``mxnet.recordio.pack``.

    A scalar label is stored in the header (flag forced to 0); an array label is stored as float32 values
    after the header, with flag = number of values and the header label field = 0.
    """
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
        prefix = b""
    else:
        label = np.asarray(header.label, dtype=np.float32).ravel()
        header = header._replace(flag=int(label.size), label=0)
        prefix = label.astype("<f4").tobytes()
    return _IR_FORMAT.pack(int(header.flag), float(header.label), int(header.id), int(header.id2)) + prefix + bytes(payload)


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into its IRHeader and payload like ``mxnet.recordio.unpack``.

    The label is a float when flag == 0, else a float32 numpy array of ``flag`` values.
    """
    if len(record) < _IR_SIZE:
        raise ValueError(f"record of {len(record)} bytes is shorter than the {_IR_SIZE}-byte IRHeader")
    header = IRHeader(*_IR_FORMAT.unpack_from(record, 0))
    payload = record[_IR_SIZE:]
    if header.flag > 0:
        num_bytes = 4 * header.flag
        if len(payload) < num_bytes:
            raise ValueError(
                f"IRHeader flag={header.flag} promises {header.flag} float32 labels ({num_bytes} bytes) "
                f"but only {len(payload)} bytes follow the header"
            )
        label = np.frombuffer(payload, dtype="<f4", count=header.flag).astype(np.float32)
        header = header._replace(label=label)
        payload = payload[num_bytes:]
    return header, bytes(payload)


# ----------------------------------------------------------------------------------------------------------
# framing (dmlc::RecordIOWriter::WriteRecord)


def encode_record(record: bytes) -> bytes:
    """Frame one record exactly as dmlc's RecordIOWriter::WriteRecord does (magic splitting and padding)."""
    record = bytes(record)
    size = len(record)
    if size >= _MAX_CHUNK:
        raise ValueError(f"record of {size} bytes is too large: RecordIO records must be under {_MAX_CHUNK} bytes")
    lower_align = size & ~3
    out = []
    dptr = 0
    pos = record.find(_MAGIC_BYTES)
    while 0 <= pos < lower_align:
        if pos % 4 == 0:  # dmlc only checks 4-byte aligned positions
            out.append(_LREC.pack(MAGIC, ((1 if dptr == 0 else 2) << 29) | (pos - dptr)))
            out.append(record[dptr:pos])
            dptr = pos + 4
        pos = record.find(_MAGIC_BYTES, pos + 1)
    out.append(_LREC.pack(MAGIC, ((3 if dptr != 0 else 0) << 29) | (size - dptr)))
    out.append(record[dptr:])
    out.append(b"\0" * (-size % 4))
    return b"".join(out)


# ----------------------------------------------------------------------------------------------------------
# reader


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"RecordIO {what} file not found", str(path))


def _default_idx(rec_path: Path) -> Path:
    return rec_path.with_suffix(".idx")


class RecordIOReader:
    """Random-access reader for an MXNet indexed RecordIO pair (``MXIndexedRecordIO(..., 'r')``).

    The index is parsed and validated eagerly; the ``.rec`` file is memory-mapped on first use in each
    process (tracked by pid), so the object can be created before DataLoader workers fork or be pickled
    to spawned workers.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: the ``.idx`` file; defaults to ``rec_path`` with an ``.idx`` suffix.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else _default_idx(self.rec_path)
        if not self.rec_path.is_file():
            raise _missing(self.rec_path, "data")
        if not self.idx_path.is_file():
            raise _missing(self.idx_path, "index")
        self._size = self.rec_path.stat().st_size
        self._offsets: dict[int, int] = {}
        self.keys: list[int] = []
        self._parse_idx()
        self._pid: int | None = None
        self._file = None
        self._buf: Any = None

    def _parse_idx(self) -> None:
        first_line: dict[int, int] = {}
        with open(self.idx_path, "r", encoding="ascii", errors="replace", newline=None) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                try:
                    if len(parts) != 2:
                        raise ValueError
                    key, offset = int(parts[0]), int(parts[1])
                    if offset < 0:
                        raise ValueError
                except ValueError:
                    raise ValueError(
                        f"{self.idx_path}:{lineno}: malformed index line {line.rstrip(chr(10))!r}; "
                        f"expected '<int key>\\t<non-negative offset>'"
                    ) from None
                if key in first_line:
                    raise ValueError(
                        f"{self.idx_path}:{lineno}: duplicate key {key} (first on line {first_line[key]})"
                    )
                if offset >= self._size:
                    raise ValueError(
                        f"{self.idx_path}:{lineno}: key {key} has offset {offset}, past the end of "
                        f"{self.rec_path} ({self._size} bytes)"
                    )
                first_line[key] = lineno
                self._offsets[key] = offset
                self.keys.append(key)

    # -- process-local mapping ------------------------------------------------------------------------------
    def _data(self) -> Any:
        pid = os.getpid()
        if self._pid != pid:
            # In a forked child the parent's map and file object are inherited; leave them to the parent and
            # open our own, so no file position or mapping is shared between processes.
            self._file = open(self.rec_path, "rb")
            size = os.fstat(self._file.fileno()).st_size
            if size != self._size:
                self._file.close()
                self._file = None
                raise ValueError(f"{self.rec_path} changed size since it was indexed ({self._size} -> {size} bytes)")
            self._buf = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._pid = pid
        return self._buf

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _file=None, _buf=None)
        return state

    # -- reading --------------------------------------------------------------------------------------------
    def _where(self, key: int | None) -> str:
        return f" (key {key})" if key is not None else ""

    def read_at(self, offset: int, *, key: int | None = None, limit: int | None = None) -> bytes:
        """Read the record that starts at byte ``offset``, joining split chunks.

        Args:
            offset: file offset of the record's first chunk.
            key: only used in error messages.
            limit: stop after the chunk that brings the record to at least ``limit`` bytes (cheap header
                peeks); ``None`` reads the whole record.
        """
        buf = self._data()
        size = self._size
        parts: list[bytes] = []
        num_bytes = 0
        pos = offset
        first = True
        while True:
            if pos + 8 > size:
                raise ValueError(
                    f"{self.rec_path}: truncated record{self._where(key)}: chunk header at offset {pos} "
                    f"needs 8 bytes, file has {size}"
                )
            magic, lrec = _LREC.unpack_from(buf, pos)
            if magic != MAGIC:
                raise ValueError(
                    f"{self.rec_path}: bad magic 0x{magic:08x} at offset {pos}{self._where(key)}; "
                    f"expected 0x{MAGIC:08x}"
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if (cflag in (0, 1)) != first:
                state = "a record start" if first else "a continuation"
                raise ValueError(
                    f"{self.rec_path}: chunk at offset {pos}{self._where(key)} has cflag {cflag}, "
                    f"not valid for {state}"
                )
            start = pos + 8
            end = start + length
            if start + ((length + 3) & ~3) > size:
                raise ValueError(
                    f"{self.rec_path}: truncated record{self._where(key)}: chunk at offset {pos} has "
                    f"{length} bytes but the file ends at {size}"
                )
            if not first:
                parts.append(_MAGIC_BYTES)
                num_bytes += 4
            parts.append(buf[start:end])
            num_bytes += length
            if cflag in (0, 3):
                break
            if limit is not None and num_bytes >= limit:
                break
            pos = start + ((length + 3) & ~3)
            first = False
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _offset(self, key: int) -> int:
        try:
            return self._offsets[key]
        except (KeyError, TypeError):
            raise KeyError(f"key {key!r} not in {self.idx_path}") from None

    def read_idx(self, key: int) -> bytes:
        """Return the record stored under ``key`` (``MXIndexedRecordIO.read_idx``)."""
        return self.read_at(self._offset(key), key=key)

    def read_header(self, key: int) -> IRHeader:
        """Return only the IRHeader of ``key``'s record, without copying the whole payload."""
        record = self.read_at(self._offset(key), key=key, limit=_IR_SIZE)
        if len(record) >= _IR_SIZE:
            flag = _IR_FORMAT.unpack_from(record, 0)[0]
            if len(record) < _IR_SIZE + 4 * flag:
                record = self.read_idx(key)
        try:
            header, _ = unpack(record)
        except ValueError as e:
            raise ValueError(f"{self.rec_path}: key {key}: {e}") from None
        return header

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for key in self.keys:
            yield key, self.read_idx(key)

    def close(self) -> None:
        if self._pid == os.getpid():
            if isinstance(self._buf, mmap.mmap):
                self._buf.close()
            if self._file is not None:
                self._file.close()
        self._buf = self._file = self._pid = None

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RecordIOReader({str(self.rec_path)!r}, {len(self)} records)"


# ----------------------------------------------------------------------------------------------------------
# writer


class RecordIOWriter:
    """Writer for an MXNet indexed RecordIO pair (``MXIndexedRecordIO(..., 'w')``), byte-identical to MXNet.

    Both files are written under temporary names beside the targets and renamed into place by ``close()``;
    leaving a ``with`` block by an exception removes them instead, so a crash never leaves a half-written
    dataset under the final names.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else _default_idx(self.rec_path)
        if self.rec_path.resolve() == self.idx_path.resolve():
            raise ValueError(f"rec and idx paths are the same file: {self.rec_path}")
        suffix = f".tmp{os.getpid()}"
        self._tmp_rec = self.rec_path.with_name(self.rec_path.name + suffix)
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + suffix)
        self._rec = open(self._tmp_rec, "wb")
        try:
            self._idx = open(self._tmp_idx, "w", encoding="ascii", newline="\n")
        except BaseException:
            self._rec.close()
            self._tmp_rec.unlink(missing_ok=True)
            raise
        self._pos = 0
        self._keys: set[int] = set()
        self._closed = False
        self._owner_pid = os.getpid()

    def tell(self) -> int:
        """Offset at which the next record will start."""
        return self._pos

    def write(self, record: bytes) -> int:
        """Append one record without an index entry; return its offset."""
        if self._closed:
            raise ValueError(f"write to closed RecordIOWriter for {self.rec_path}")
        offset = self._pos
        framed = encode_record(record)
        self._rec.write(framed)
        self._pos += len(framed)
        return offset

    def write_idx(self, key: int, record: bytes) -> None:
        """Append ``record`` under integer ``key`` (``MXIndexedRecordIO.write_idx``)."""
        if isinstance(key, bool) or not isinstance(key, numbers.Integral):
            raise ValueError(f"RecordIO key must be an int, got {key!r} ({type(key).__name__})")
        key = int(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key} written to {self.rec_path}")
        offset = self.write(record)
        self._idx.write(f"{key}\t{offset}\n")
        self._keys.add(key)

    def close(self) -> None:
        """Flush both files and move them to their final names."""
        if self._closed:
            return
        self._closed = True
        for f in (self._rec, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        os.replace(self._tmp_rec, self.rec_path)
        os.replace(self._tmp_idx, self.idx_path)

    def abort(self) -> None:
        """Discard everything written; the final paths are left untouched."""
        if self._closed:
            return
        self._closed = True
        for f, p in ((self._rec, self._tmp_rec), (self._idx, self._tmp_idx)):
            f.close()
            p.unlink(missing_ok=True)

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # an unclosed writer never publishes a partial file
        try:
            if getattr(self, "_owner_pid", None) == os.getpid():  # not in a forked child
                self.abort()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------------------
# insightface dataset layout


def _read_property(path: Path) -> tuple[int, int, int]:
    text = path.read_text().strip()
    try:
        num_classes, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width', got {text!r}") from None
    return num_classes, h, w


def _label_int(label: Any, where: str) -> int:
    value = float(label) if isinstance(label, numbers.Number) else float(np.asarray(label).ravel()[0])
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise ValueError(f"{where}: image label {value} is not a non-negative integer")
    return int(value)


def read_insightface_layout(
    reader: RecordIOReader,
    property_path: str | os.PathLike | None = None,
    *,
    read_identities: bool = True,
) -> dict:
    """Describe an insightface-style record: which keys are images and how many identities there are.

    insightface's layout: record 0 is a header with flag > 0 and label ``[first_identity_key, end_key]``;
    images are keys ``1 .. first_identity_key - 1``; keys ``first_identity_key .. end_key - 1`` are identity
    records (label ``[first_image_key, end_image_key)``, empty payload). A record whose key 0 is missing or
    has flag 0 has no header: every record is an image and the class count is ``max(label) + 1`` (this
    reads every record's header).

    Args:
        reader: an open RecordIOReader.
        property_path: insightface ``property`` file (``num_classes,h,w``); defaults to ``property`` next to
            the rec file when that exists. Its class count must agree with the record.
        read_identities: read the identity records into ``identity_ranges`` (one small read per class).

    Returns:
        dict(image_keys=int64 numpy array, num_images, num_classes, identity_ranges=list of (start, end)
        per class or None, has_header, image_size=(h, w) from the property file or None).
    """
    rec = reader.rec_path
    identity_ranges = None
    has_header = False
    if 0 in reader._offsets:
        header0 = reader.read_header(0)
        has_header = header0.flag > 0
    if has_header:
        label = np.asarray(header0.label).ravel()
        if label.size < 2:
            raise ValueError(f"{rec}: header record 0 has {label.size} label value(s); expected [first_id, end]")
        first_id, end_id = int(label[0]), int(label[1])
        if not 1 <= first_id <= end_id:
            raise ValueError(f"{rec}: header record 0 label {label.tolist()} is not [first_id >= 1, end >= first_id]")
        image_keys = np.arange(1, first_id, dtype=np.int64)
        num_classes = end_id - first_id
        missing = [k for k in (1, first_id - 1) if first_id > 1 and k not in reader._offsets]
        if missing:
            raise ValueError(f"{rec}: header says images are keys 1..{first_id - 1} but key {missing[0]} is not indexed")
        if read_identities:
            identity_ranges = []
            for key in range(first_id, end_id):
                if key not in reader._offsets:
                    raise ValueError(f"{rec}: identity record {key} (of {first_id}..{end_id - 1}) is not indexed")
                h = reader.read_header(key)
                lab = np.asarray(h.label).ravel()
                if h.flag < 2 or not 1 <= lab[0] <= lab[1] <= first_id:
                    raise ValueError(
                        f"{rec}: identity record {key} has label {lab.tolist()}; expected [start, end) within "
                        f"image keys 1..{first_id - 1}"
                    )
                identity_ranges.append((int(lab[0]), int(lab[1])))
    else:
        image_keys = np.asarray(reader.keys, dtype=np.int64)
        max_label = -1
        for key in reader.keys:
            max_label = max(max_label, _label_int(reader.read_header(key).label, f"{rec}: key {key}"))
        num_classes = max_label + 1

    image_size = None
    prop = Path(property_path) if property_path is not None else rec.parent / "property"
    if property_path is not None and not prop.is_file():
        raise FileNotFoundError(errno.ENOENT, "insightface property file not found", str(prop))
    if prop.is_file():
        prop_classes, h, w = _read_property(prop)
        image_size = (h, w)
        if prop_classes != num_classes:
            raise ValueError(f"{prop} says {prop_classes} classes but {rec} holds {num_classes}")
    return dict(
        image_keys=image_keys,
        num_images=int(image_keys.size),
        num_classes=int(num_classes),
        identity_ranges=identity_ranges,
        has_header=has_header,
        image_size=image_size,
    )


class InsightFaceRecord:
    """An insightface dataset directory (``train.rec``, ``train.idx``, ``property``) as an indexable dataset.

    ``record[i]`` is ``(image_bytes, label)`` for the i-th image, the same samples in the same order as
    arcface_torch's ``MXFaceDataset`` (undecoded). Safe to use from forked DataLoader workers.

    Args:
        path: a directory holding ``train.rec``/``train.idx`` or the path of a ``.rec`` file.
        read_identities: see ``read_insightface_layout``.
    """

    def __init__(self, path: str | os.PathLike, *, read_identities: bool = False) -> None:
        path = Path(path)
        rec_path = path / "train.rec" if path.is_dir() else path
        self.reader = RecordIOReader(rec_path)
        layout = read_insightface_layout(self.reader, read_identities=read_identities)
        self.image_keys: np.ndarray = layout["image_keys"]
        self.num_classes: int = layout["num_classes"]
        self.identity_ranges = layout["identity_ranges"]
        self.image_size = layout["image_size"]

    def __len__(self) -> int:
        return int(self.image_keys.size)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        key = int(self.image_keys[index])
        header, payload = unpack(self.reader.read_idx(key))
        return payload, _label_int(header.label, f"{self.reader.rec_path}: key {key}")

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "InsightFaceRecord":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
