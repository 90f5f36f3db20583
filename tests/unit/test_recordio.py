"""RecordIO reader/writer against files written by MXNet 1.9.1 (../shared/data/recordio_golden)."""
import hashlib
import io
import json
import pickle
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from dali_pipes.recordio import (
    MAGIC,
    InsightFaceRecord,
    IRHeader,
    RecordIOReader,
    RecordIOWriter,
    encode_record,
    pack,
    read_insightface_layout,
    unpack,
)

MAGIC_BYTES = struct.pack("<I", MAGIC)


@pytest.fixture(scope="module")
def golden(shared_data):
    return shared_data / "recordio_golden"


@pytest.fixture(scope="module")
def expected(golden):
    return json.loads((golden / "expected.json").read_text())


@pytest.fixture
def golden_copy(golden, tmp_path):
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(golden / name, tmp_path / name)
        (tmp_path / name).chmod(0o644)
    return tmp_path


def _chunk(cflag, data):
    return struct.pack("<II", MAGIC, (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


# ---------------------------------------------------------------------------------------------- golden file


def test_golden_every_record(golden, expected):
    with RecordIOReader(golden / "train.rec") as r:
        assert r.keys == list(range(49)) and len(r) == 49
        head, payload = unpack(r.read_idx(0))
        assert head.flag == 2 and head.label.dtype == np.float32
        assert head.label.tolist() == [41.0, 49.0] and payload == b""
        for cls in range(8):
            h, p = unpack(r.read_idx(41 + cls))
            assert h.flag == 2 and h.label.tolist() == [1 + 5 * cls, 6 + 5 * cls] and p == b""
        assert len(expected["images"]) == 40
        for item in expected["images"]:
            key = item["key"]
            h, jpeg = unpack(r.read_idx(key))
            assert h.flag == 0 and isinstance(h.label, float) and h.label == item["label"]
            assert h.id == key and h.id2 == 0
            assert hashlib.sha256(jpeg).hexdigest() == item["jpeg_sha256"]
            pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            assert pixels.shape == (112, 112, 3)
            assert pixels.mean(dtype=np.float64) == pytest.approx(item["decoded_mean"], abs=1e-9)
        # pack() reproduces every record byte for byte (header, identity and image records)
        for key in r.keys:
            rec = r.read_idx(key)
            assert pack(*unpack(rec)) == rec


def test_golden_rewrite_is_byte_identical(golden, tmp_path):
    with RecordIOReader(golden / "train.rec", golden / "train.idx") as r, RecordIOWriter(tmp_path / "out.rec") as w:
        for key in r.keys:
            w.write_idx(key, r.read_idx(key))
    assert (tmp_path / "out.rec").read_bytes() == (golden / "train.rec").read_bytes()
    assert (tmp_path / "out.idx").read_bytes() == (golden / "train.idx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.idx", "out.rec"]  # no temp files left


def test_golden_layout(golden, expected):
    with RecordIOReader(golden / "train.rec") as r:
        lay = read_insightface_layout(r)
    assert lay["image_keys"].tolist() == [i["key"] for i in expected["images"]]
    assert lay["num_images"] == expected["num_images"] == 40
    assert lay["num_classes"] == expected["num_classes"] == 8
    assert lay["identity_ranges"] == [(1 + 5 * c, 6 + 5 * c) for c in range(8)]
    assert lay["has_header"] and lay["image_size"] == (112, 112)
    ds = InsightFaceRecord(golden)
    assert len(ds) == 40 and ds.num_classes == 8
    payload, label = ds[7]
    assert label == 1 and hashlib.sha256(payload).hexdigest() == expected["images"][7]["jpeg_sha256"]
    ds.close()


def test_layout_property_mismatch(golden_copy):
    (golden_copy / "property").write_text("9,112,112")
    with RecordIOReader(golden_copy / "train.rec") as r, pytest.raises(ValueError, match=r"property says 9 classes.*holds 8"):
        read_insightface_layout(r)


def test_layout_without_header(golden, tmp_path):
    with RecordIOReader(golden / "train.rec") as r, RecordIOWriter(tmp_path / "train.rec") as w:
        for new_key, key in enumerate(range(1, 41)):
            h, p = unpack(r.read_idx(key))
            label = h.label if key % 2 else [h.label, 99.0]  # array labels too: label[0] is the class
            w.write_idx(new_key, pack(IRHeader(0, label, new_key, 0), p))
    with RecordIOReader(tmp_path / "train.rec") as r:
        lay = read_insightface_layout(r)
    assert lay["image_keys"].tolist() == list(range(40))
    assert lay["num_classes"] == 8 and not lay["has_header"] and lay["identity_ranges"] is None
    ds = InsightFaceRecord(tmp_path / "train.rec")
    assert [ds[i][1] for i in range(40)] == [i // 5 for i in range(40)]


# ---------------------------------------------------------------------------------------------- framing


def test_pack_unpack_roundtrip():
    rec = pack(IRHeader(0, 3.0, 7, 9), b"xyz")
    assert rec == struct.pack("<IfQQ", 0, 3.0, 7, 9) + b"xyz"
    assert unpack(rec) == (IRHeader(0, 3.0, 7, 9), b"xyz")
    rec = pack(IRHeader(123, [1.5, 2.5, 3.5], 1, 2), b"ab")  # flag is derived from the label length
    assert rec == struct.pack("<IfQQ", 3, 0.0, 1, 2) + np.array([1.5, 2.5, 3.5], "<f4").tobytes() + b"ab"
    h, p = unpack(rec)
    assert h.flag == 3 and h.label.tolist() == [1.5, 2.5, 3.5] and p == b"ab"


def test_magic_split_like_dmlc():
    m = MAGIC_BYTES
    # no magic: one whole chunk, padded
    assert encode_record(b"abcde") == _chunk(0, b"abcde")
    # unaligned magic (offset 1, 6) is not split
    unaligned = b"a" + m + b"bc" + m + b"d"
    assert encode_record(unaligned) == _chunk(0, unaligned)
    # aligned at 0, 4 (consecutive), 12 and an unaligned one at 17; tail of 3 bytes is padded
    payload = m + m + b"wxyz" + m + b"q" + m + b"rs"
    assert len(payload) == 23
    expected = (
        _chunk(1, b"")  # start: empty piece before the magic at 0
        + _chunk(2, b"")  # magic at 4 follows directly
        + _chunk(2, b"wxyz")
        + _chunk(3, b"q" + m + b"rs")  # unaligned magic at 17 stays in the final chunk
    )
    assert encode_record(payload) == expected
    # magic as the last aligned word: the end chunk is empty
    assert encode_record(b"abcd" + m) == _chunk(1, b"abcd") + _chunk(3, b"")
    # magic starting in the unaligned tail (lower_align excludes it) is not split
    tail = b"abcde" + m
    assert encode_record(tail) == _chunk(0, tail)


def test_magic_payload_roundtrip(tmp_path):
    m = MAGIC_BYTES
    rng = np.random.default_rng(0)
    records = {
        0: m,
        1: b"ab" + m + b"cd",
        2: m + m + b"wxyz" + m + b"q" + m + b"rs",
        3: b"",
        4: b"1234" + m,
        5: rng.bytes(1000) + m + rng.bytes(3) + m + rng.bytes(17),
    }
    with RecordIOWriter(tmp_path / "m.rec") as w:
        for k, v in records.items():
            w.write_idx(k, v)
    with RecordIOReader(tmp_path / "m.rec") as r:
        for k, v in records.items():
            assert r.read_idx(k) == v
    # the file contains the multi-part framing
    data = (tmp_path / "m.rec").read_bytes()
    flags = []
    pos = 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC
        flags.append(lrec >> 29)
        pos += 8 + (((lrec & (2**29 - 1)) + 3) & ~3)
    assert flags == [1, 3, 0, 1, 2, 2, 3, 0, 1, 3, 1, 3]


def test_writer_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with RecordIOWriter(tmp_path / "x.rec") as w:
            w.write_idx(0, b"data")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with RecordIOWriter(tmp_path / "x.rec") as w:
        w.write_idx(0, b"data")
        with pytest.raises(ValueError, match="duplicate key 0"):
            w.write_idx(0, b"again")
        with pytest.raises(ValueError, match="must be an int"):
            w.write_idx("a", b"x")
        assert not (tmp_path / "x.rec").exists()  # only renamed into place on close
    assert (tmp_path / "x.idx").read_text() == "0\t0\n"


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_files(golden_copy):
    with pytest.raises(FileNotFoundError, match="nope.rec"):
        RecordIOReader(golden_copy / "nope.rec")
    (golden_copy / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.idx"):
        RecordIOReader(golden_copy / "train.rec")


def test_unknown_key(golden):
    with RecordIOReader(golden / "train.rec") as r, pytest.raises(KeyError, match=r"key 49 not in .*train\.idx"):
        r.read_idx(49)


def test_idx_offset_past_end(golden_copy):
    idx = golden_copy / "train.idx"
    lines = idx.read_text().splitlines(keepends=True)
    lines[5] = "5\t999999\n"
    idx.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"train\.idx:6: key 5 has offset 999999, past the end of .*train\.rec"):
        RecordIOReader(golden_copy / "train.rec")


@pytest.mark.parametrize("line", ["7 41432\n", "7\tabc\n", "x\t41432\n", "7\t-3\n", "7\t1\t2\n"])
def test_malformed_idx_line(golden_copy, line):
    idx = golden_copy / "train.idx"
    lines = idx.read_text().splitlines(keepends=True)
    lines[7] = line
    idx.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"train\.idx:8: malformed index line"):
        RecordIOReader(golden_copy / "train.rec")


def test_duplicate_idx_key(golden_copy):
    idx = golden_copy / "train.idx"
    idx.write_text(idx.read_text() + "3\t0\n")
    with pytest.raises(ValueError, match=r"train\.idx:50: duplicate key 3 \(first on line 4\)"):
        RecordIOReader(golden_copy / "train.rec")


def test_truncated_record(golden_copy):
    rec = golden_copy / "train.rec"
    data = rec.read_bytes()
    rec.write_bytes(data[: 229912 + 100])  # key 40 starts at 229912 and is ~6 KB
    idx = golden_copy / "train.idx"
    idx.write_text("".join(l for l in idx.read_text().splitlines(keepends=True) if int(l.split()[0]) <= 40))
    with RecordIOReader(rec) as r:
        assert len(r.read_idx(39)) > 0
        with pytest.raises(ValueError, match=r"train\.rec: truncated record \(key 40\): chunk at offset 229912"):
            r.read_idx(40)
    rec.write_bytes(data[: 229912 + 5])  # not even a whole chunk header
    with RecordIOReader(rec) as r, pytest.raises(ValueError, match=r"truncated record \(key 40\): chunk header at offset 229912"):
        r.read_idx(40)


def test_bad_magic(golden_copy):
    rec = golden_copy / "train.rec"
    data = bytearray(rec.read_bytes())
    data[5916:5920] = b"\xde\xad\xbe\xef"  # key 2
    rec.write_bytes(bytes(data))
    with RecordIOReader(rec) as r:
        r.read_idx(1)
        with pytest.raises(ValueError, match=r"train\.rec: bad magic 0xefbeadde at offset 5916 \(key 2\)"):
            r.read_idx(2)
    # an idx offset that points inside a record is caught the same way
    idx = golden_copy / "train.idx"
    idx.write_text(idx.read_text().replace("3\t11864\n", "3\t11868\n"))
    with RecordIOReader(rec) as r, pytest.raises(ValueError, match=r"bad magic .* at offset 11868 \(key 3\)"):
        r.read_idx(3)


def test_bad_continuation_flag(tmp_path):
    (tmp_path / "c.rec").write_bytes(_chunk(2, b"abcd"))
    (tmp_path / "c.idx").write_text("0\t0\n")
    with RecordIOReader(tmp_path / "c.rec") as r, pytest.raises(ValueError, match=r"offset 0 \(key 0\) has cflag 2"):
        r.read_idx(0)


def test_bad_property(golden_copy):
    (golden_copy / "property").write_text("8,112")
    with RecordIOReader(golden_copy / "train.rec") as r, pytest.raises(ValueError, match="num_classes,height,width"):
        read_insightface_layout(r)


# ---------------------------------------------------------------------------------------------- processes


class _KeyDataset:
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, i):
        import os

        return self.reader.keys[i], self.reader.read_idx(self.reader.keys[i]), os.getpid()


def test_forked_dataloader_workers(golden):
    import os

    import torch.utils.data as tud

    reader = RecordIOReader(golden / "train.rec")
    want = {k: reader.read_idx(k) for k in reader.keys}  # map in the parent before forking
    loader = tud.DataLoader(
        _KeyDataset(reader), batch_size=None, num_workers=2, multiprocessing_context="fork", shuffle=False
    )
    got, pids = {}, set()
    for key, data, pid in loader:
        got[int(key)] = data
        pids.add(int(pid))
    assert got == want
    assert len(pids) == 2 and os.getpid() not in pids
    assert reader.read_idx(5) == want[5]  # the parent's mapping still works
    reader.close()


def test_reader_pickles_without_mapping(golden):
    with RecordIOReader(golden / "train.rec") as r:
        first = r.read_idx(1)
        clone = pickle.loads(pickle.dumps(r))
        assert clone.read_idx(1) == first and clone.keys == r.keys
        clone.close()
