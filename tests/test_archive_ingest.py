"""The archive's store path reads a received data set once: the structural check
keeps the raw values the index needs, and the index rows made from them are the
ones a full read of the stored file gives (the re-index's way)."""

from __future__ import annotations

import array
import asyncio
import copy
import glob
import io
import json
import os
import warnings

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.uid import generate_uid
from test_archive import in_process_archive

from dimse_async import AE
from dimse_async.archive.backend import IndexRow
from dimse_async.archive.index import Archive
from dimse_async.archive.schema import INDEX_TAGS, LEVEL_KEYS, dataset_of_kept, level_attrs, text_of
from dimse_async.dataset_check import DataSetError, check_dataset_bytes, check_part10
from dimse_async.part10 import read_file_meta


def _sample_files() -> list[str]:
    folder = os.path.dirname(get_testdata_file("CT_small.dcm"))
    return sorted(glob.glob(os.path.join(folder, "*.dcm"))) + sorted(get_charset_files("chr*.dcm"))


def test_kept_values_decode_as_a_full_read():
    """For every sample file the check accepts (explicit / implicit / big endian,
    deflated, character sets): the attributes indexed from the kept raw values equal
    those of pydicom reading the whole file, on both walks (file and bytes)."""
    compared = 0
    for path in _sample_files():
        with open(path, "rb") as fp:
            data = fp.read()
        try:
            by_file = check_part10(io.BytesIO(data), INDEX_TAGS)
        except DataSetError:
            continue
        meta = read_file_meta(io.BytesIO(data))
        assert meta is not None
        by_bytes = check_dataset_bytes(data[meta.dataset_offset :], meta.transfer_syntax, INDEX_TAGS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = pydicom.dcmread(path, stop_before_pixels=True)
            for summary in (by_file, by_bytes):
                kept = dataset_of_kept(summary.kept, summary.transfer_syntax)
                for level, keys in LEVEL_KEYS.items():
                    expected = {k: text_of(full.get(k)) for k in keys if k in full}
                    if "SpecificCharacterSet" in full:
                        expected["SpecificCharacterSet"] = text_of(full.SpecificCharacterSet)
                    assert level_attrs(kept, level) == expected, (os.path.basename(path), level)
        compared += 1
    assert compared > 40  # the sample set really was walked


def _rows(arch: Archive) -> dict[str, list[tuple]]:
    db = arch.connection()
    return {
        "patients": sorted(
            (r[0], r[1], json.loads(r[2]), r[3])
            for r in db.execute("SELECT patient_key, patient_id, attrs, name_key FROM patients")
        ),
        "studies": sorted(
            (r[0], r[1], r[2], r[3], json.loads(r[4]))
            for r in db.execute("SELECT study_uid, patient_key, study_date, accession, attrs FROM studies")
        ),
        "series": sorted(
            (r[0], r[1], r[2], json.loads(r[3]))
            for r in db.execute("SELECT series_uid, study_uid, modality, attrs FROM series")
        ),
        "instances": sorted(
            (r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]))
            for r in db.execute(
                "SELECT sop_uid, series_uid, sop_class, transfer_syntax, path, size, attrs FROM instances"
            )
        ),
    }


def _clear(arch: Archive) -> None:
    db = arch.connection()
    with db:
        for table in ("instances", "series", "studies", "patients"):
            db.execute(f"DELETE FROM {table}")


async def test_stored_rows_equal_reindexed_rows(tmp_path, index):
    """Instances in several syntaxes and character sets stored through a real
    association: the index rows the store made are exactly those a re-index of the
    stored files makes from a full read of each file."""
    names = ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "image_dfl.dcm"]
    sources = [get_testdata_file(n) for n in names]
    sources += [p for p in get_charset_files("chr*.dcm") if "SQEncoding" not in p]
    src = tmp_path / "src"
    src.mkdir()
    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, path in enumerate(sources):
            ds = pydicom.dcmread(path)
            # one patient, study and series each: upserts of shared ones depend on the order
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = generate_uid(), generate_uid(), f"P{i}"
            out = src / f"{i}.dcm"
            ds.save_as(out)
            files.append(out)
    arch, ae = in_process_archive(tmp_path, index)
    try:
        async with await ae.start_server("127.0.0.1", 0) as server:
            scu = AE("SCU")
            for f in files:
                meta = read_file_meta(open(f, "rb"))  # noqa: SIM115 - closed with the test's tmp dir
                assert meta is not None
                scu.add_requested_context(meta.sop_class_uid, [meta.transfer_syntax])
            async with scu.associate("127.0.0.1", server.port, "ARCHIVE") as assoc:
                statuses = await asyncio.gather(*(assoc.c_store(f) for f in files))
        assert [int(s) for s in statuses] == [0] * len(files)
        stored = await arch.in_index_thread(_rows, arch)
        assert len(stored["instances"]) == len(files)
        await arch.in_index_thread(_clear, arch)
        assert await arch.reindex() == (len(files), 0, 0)
        assert await arch.in_index_thread(_rows, arch) == stored
    finally:
        arch.close()


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm"])
def test_index_tags_cover_every_indexed_attribute(name):
    """Nothing the index stores is missed by the one-pass walk: every attribute of
    :data:`LEVEL_KEYS` and the hierarchy's UIDs are among the kept tags."""
    for keys in LEVEL_KEYS.values():
        for keyword in keys:
            assert int(pydicom.datadict.tag_for_keyword(keyword) or 0) in INDEX_TAGS, keyword
    with open(get_testdata_file(name), "rb") as fp:
        summary = check_part10(fp, INDEX_TAGS)
    assert {0x0020000D, 0x0020000E, 0x00080018} <= set(summary.kept)


def _patient_row(key: str, patient_id: str | None) -> IndexRow:
    """An index row of its own patient, study, series and instance."""
    return IndexRow(
        key, patient_id, "{}", "", f"st-{key}", "", "", "{}", f"se-{key}", "", "{}",
        f"sop-{key}", "1.2", "1.2.840.10008.1.2.1", f"/nowhere/{key}.dcm", 1, 0.0, "{}",
    )  # fmt: skip


def _committed(root, key: str) -> bool:
    """Whether ``key``'s row is committed: seen from a connection of its own."""
    import sqlite3

    db = sqlite3.connect(f"file:{root / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT 1 FROM patients WHERE patient_key = ?", (key,)).fetchone() is not None
    finally:
        db.close()


async def test_group_commit_answers_each_write_after_its_commit(tmp_path):
    """SQLite: eight writes arriving while the writer is busy share one transaction.
    The one whose statement fails (NOT NULL) is rolled back alone and gets its error;
    each of the others is answered only once its row is visible to another connection
    (committed), and the failed one's row never is."""
    import sqlite3
    import threading

    arch = Archive(tmp_path / "arch")
    try:
        await arch.count()  # the schema exists
        gate = threading.Event()
        busy = asyncio.ensure_future(arch.in_index_thread(gate.wait, 10))  # the writer is busy
        seen: dict[str, bool | BaseException] = {}

        async def write(i: int) -> None:
            key = f"k{i}"
            try:
                await arch.commit_write(lambda: _patient_row(key, None if i == 3 else f"P{i}"))
            except sqlite3.Error as exc:
                seen[key] = exc
                return
            seen[key] = _committed(arch.root, key)  # at the very moment it is answered

        writes = [asyncio.ensure_future(write(i)) for i in range(8)]
        await asyncio.sleep(0.05)
        assert not seen and len(arch._pending) == 8  # all waiting for the one transaction
        gate.set()
        await asyncio.wait_for(asyncio.gather(busy, *writes), 30)
        assert isinstance(seen.pop("k3"), sqlite3.IntegrityError)
        assert seen == {f"k{i}": True for i in range(8) if i != 3}
        assert not _committed(arch.root, "k3")
        assert (
            await arch.in_index_thread(lambda: arch.connection().execute("SELECT COUNT(*) FROM patients").fetchone()[0])
            == 7
        )
    finally:
        arch.close()


async def test_group_commit_a_failed_transaction_fails_every_write(tmp_path, monkeypatch):
    """The shared transaction itself fails (another process holds the index's write
    lock past the busy timeout, shortened here): every write of the group gets the
    error, no row is stored; once the lock is free the next group commits."""
    import sqlite3

    from dimse_async.archive import backend_sqlite

    monkeypatch.setattr(backend_sqlite, "BUSY_TIMEOUT", 0.5)
    arch = Archive(tmp_path / "arch")
    try:
        await arch.count()
        blocker = sqlite3.connect(arch.root / "index.sqlite")
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(
                    *(arch.commit_write(lambda i=i: _patient_row(f"k{i}", f"P{i}")) for i in range(4)),
                    return_exceptions=True,
                ),
                60,
            )
        finally:
            blocker.rollback()
            blocker.close()
        assert all(isinstance(o, sqlite3.OperationalError) and "locked" in str(o) for o in outcomes), outcomes
        assert not any(_committed(arch.root, f"k{i}") for i in range(4))
        await arch.commit_write(lambda: _patient_row("k9", "P9"))
        assert _committed(arch.root, "k9")
    finally:
        arch.close()


async def test_an_instance_that_cannot_be_indexed_is_undone(tmp_path, index):
    """A data set without a Series Instance UID is refused (0xA900) after it was moved
    into place: the file is removed again. Replacing a stored instance with such a one
    (``duplicates = "replace"``) puts the previous file back byte for byte with its
    row, and the instance's lock is free again: the next valid store of it succeeds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    good = tmp_path / "good.dcm"
    ds.save_as(good)
    ds.PatientID = "CHANGED"
    del ds.SeriesInstanceUID
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    new_broken = tmp_path / "new-broken.dcm"
    ds.save_as(new_broken)

    arch, ae = in_process_archive(tmp_path, index, duplicates="replace")
    try:
        async with await ae.start_server("127.0.0.1", 0) as server:
            scu = AE("SCU")
            scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
            async with scu.associate("127.0.0.1", server.port, "ARCHIVE") as assoc:
                status = await assoc.c_store(new_broken)
                assert int(status) == 0xA900 and "index" in (status.error_comment or ""), status
                assert not arch.path_for(str(ds.SOPInstanceUID)).exists()
                assert int(await assoc.c_store(good)) == 0
                stored = arch.path_for(uid)
                before = stored.read_bytes()
                rows = await arch.in_index_thread(_rows, arch)
                status = await asyncio.wait_for(assoc.c_store(broken), 30)
                assert int(status) == 0xA900, status
                assert stored.read_bytes() == before
                assert not list(stored.parent.glob("*.old"))
                assert await arch.in_index_thread(_rows, arch) == rows
                assert int(await asyncio.wait_for(assoc.c_store(good), 30)) == 0  # the lock is free
        assert await arch.count() == 1
    finally:
        arch.close()


async def test_a_data_set_of_many_tiny_pieces_is_checked_off_the_event_loop(tmp_path, monkeypatch):
    """A small instance is checked on the event loop (no thread hop), but one cut into
    tens of thousands of empty items under 1 MiB (a walk of ~0.1-0.3 s) would stall
    every association on the loop: past :data:`ingest.IN_PLACE_BUDGET` pieces the walk
    goes to a thread. Both are stored, checked and indexed the same."""
    import struct
    import threading

    from dimse_async.archive import ingest
    from dimse_async.dataset_check import BudgetExceeded

    walks: list[tuple[bool, bool]] = []  # (on the loop's thread, finished)
    real = ingest.check_dataset_bytes

    def recorded(*args, **kwargs):
        on_loop = threading.current_thread() is threading.main_thread()
        try:
            summary = real(*args, **kwargs)
        except BudgetExceeded:
            walks.append((on_loop, False))
            raise
        walks.append((on_loop, True))
        return summary

    monkeypatch.setattr(ingest, "check_dataset_bytes", recorded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    small.SOPInstanceUID = small.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    small.save_as(tmp_path / "small.dcm")
    items = 60_000
    pieces = small.copy()
    pieces.SOPInstanceUID = pieces.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del pieces.PixelData, pieces[0xFFFCFFFC]  # the private sequence goes last
    pieces.save_as(tmp_path / "pieces.dcm")
    empty_items = (  # (0099,0010) LO creator, then (0099,1001) SQ of empty items, undefined length
        struct.pack("<HH2sH", 0x0099, 0x0010, b"LO", 4) + b"ACME"
        + struct.pack("<HH2sHI", 0x0099, 0x1001, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0) * items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )  # fmt: skip
    with open(tmp_path / "pieces.dcm", "ab") as fp:
        fp.write(empty_items)
    assert (tmp_path / "pieces.dcm").stat().st_size < 1 << 20

    arch, ae = in_process_archive(tmp_path)
    try:
        async with await ae.start_server("127.0.0.1", 0) as server:
            scu = AE("SCU")
            scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
            async with scu.associate("127.0.0.1", server.port, "ARCHIVE") as assoc:
                assert int(await assoc.c_store(tmp_path / "small.dcm")) == 0
                assert walks == [(True, True)]
                walks.clear()
                assert int(await assoc.c_store(tmp_path / "pieces.dcm")) == 0
                assert walks == [(True, False), (False, True)]
        assert await arch.count() == 2
        assert arch.path_for(str(pieces.SOPInstanceUID)).read_bytes().endswith(empty_items)
    finally:
        arch.close()


def _encoded(ds: pydicom.Dataset, syntax: str, undefined: bool | None = None) -> tuple[io.BytesIO, str, int]:
    """``ds`` as a Part 10 stream in ``syntax``; ``undefined``: every sequence and item
    written with undefined (True) or defined (False) length."""
    ds = copy.deepcopy(ds)
    if undefined is not None:
        for elem in ds.iterall():
            if elem.VR == "SQ":
                elem.is_undefined_length = undefined
                for item in elem.value:
                    item.is_undefined_length_sequence_item = undefined
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == "1.2.840.10008.1.2.2":  # pydicom writes OW/OF/OD/OL/OV values unswapped
        for elem in ds.iterall():
            unit = {"OW": "H", "OF": "I", "OL": "I", "OD": "Q", "OV": "Q"}.get(elem.VR)
            if unit and elem.value:
                words = array.array(unit, elem.value)
                words.byteswap()
                elem.value = words.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=syntax == "1.2.840.10008.1.2",
                     little_endian=syntax != "1.2.840.10008.1.2.2", enforce_file_format=True)  # fmt: skip
    buf.seek(0)
    return buf, syntax, read_file_meta(buf).dataset_offset


def test_same_dataset_in_other_encodings():
    """The element by element comparison of a stored instance with a re-send: equal
    across Implicit / Explicit VR Little Endian / deflated / Explicit VR Big Endian and
    defined / undefined sequence lengths; unequal for one value changed deep in an item;
    no answer for syntaxes that would need decoding, or past its element bound."""
    from dimse_async.dataset_check import same_dataset

    ds = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    syntaxes = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"]
    encodings = [_encoded(ds, s, u) for s in syntaxes for u in (True, False)]
    for a in encodings:
        for b in encodings:
            fa, fb = io.BytesIO(a[0].getvalue()), io.BytesIO(b[0].getvalue())
            assert same_dataset(fa, *a[1:], fb, *b[1:], max_elements=10_000) is True, (a[1], b[1])
    changed = copy.deepcopy(ds)
    changed.BeamSequence[0].ControlPointSequence[1].GantryAngle = 181
    for syntax in syntaxes:
        assert same_dataset(*_encoded(ds, syntax), *_encoded(changed, "1.2.840.10008.1.2"), 10_000) is False
    big = _encoded(ds, syntaxes[1])
    assert same_dataset(*encodings[0], big[0], "1.2.840.10008.1.2.2", big[2], 10_000) is False  # not big endian
    assert same_dataset(*encodings[0], big[0], "1.2.840.10008.1.2.4.50", big[2], 10_000) is None  # JPEG
    assert same_dataset(*_encoded(ds, syntaxes[1]), *_encoded(ds, syntaxes[0]), 10) is None
    truncated = _encoded(ds, syntaxes[1])
    cut = io.BytesIO(truncated[0].getvalue()[:-10])
    assert same_dataset(*_encoded(ds, syntaxes[1]), cut, truncated[1], truncated[2], 10_000) is False


def test_same_dataset_in_big_endian_compares_numbers_by_their_vr():
    """Explicit VR Big Endian against the little endian syntaxes (PS3.5 §7.3): each
    number (US, SS, UL, SL, FL, FD, AT, OW pixel data) compared byte-swapped by its VR,
    text and OB as they are. Rows 128 (80 00 little endian) against 32768 (80 00 big
    endian), or pixels with their bytes swapped: different values, though the same bytes."""
    from dimse_async.dataset_check import same_dataset

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.add_new(0x00209165, "AT", [0x00180050, 0x00280030])  # Dimension Index Pointer
    big = "1.2.840.10008.1.2.2"
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", big):
        assert same_dataset(*_encoded(ds, syntax), *_encoded(ds, big), 10_000) is True, syntax
        assert same_dataset(*_encoded(ds, big), *_encoded(ds, syntax), 10_000) is True, syntax
    assert ds.Rows == 0x0080
    rows = copy.deepcopy(ds)
    rows.Rows = 0x8000
    assert same_dataset(*_encoded(ds, "1.2.840.10008.1.2"), *_encoded(rows, big), 10_000) is False
    pixel = copy.deepcopy(ds)  # each pixel's bytes swapped: sent as the stored bytes
    words = array.array("H", pixel.PixelData)
    words.byteswap()
    pixel.PixelData = words.tobytes()
    assert same_dataset(*_encoded(ds, "1.2.840.10008.1.2.1"), *_encoded(pixel, big), 10_000) is False


def _item_heavy(items: int, ds: pydicom.Dataset | None = None) -> bytes:
    """A data set (Explicit VR Little Endian) of a few elements and one private sequence
    of ``items`` empty items: 8 bytes each, deflating about 700 to 1."""
    from dimse_async.codec import encode_dataset

    if ds is None:
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for elem in list(ds):
        if elem.tag.group >= 0x0099:
            del ds[elem.tag]
    return (
        encode_dataset(ds, "1.2.840.10008.1.2.1")
        + b"\x99\x00\x10\x00LO\x04\x00ACME"
        + b"\x99\x00\x01\x10SQ\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\x00\x00\x00\x00" * items
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )


def _deflate(data: bytes) -> bytes:
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = packer.compress(data) + packer.flush()
    return out + (b"\x00" if len(out) % 2 else b"")


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"])
def test_an_item_heavy_data_set_is_refused_past_the_element_limit_in_bounded_time(syntax):
    """Millions of empty sequence items (a few KB deflated, within the inflation limits)
    cost one step of the walk each: past ``max_elements`` elements, items and fragments
    the check stops (TooManyElements, a DataSetError: 0xC000), after a CPU time linear
    in the limit (well under a second per million here); just under it, it passes."""
    import time

    from dimse_async.dataset_check import MAX_ELEMENTS, NO_LIMIT, TooManyElements, check_dataset

    raw = _item_heavy(200_000)
    data = _deflate(raw) if syntax.endswith(".99") else raw
    started = time.thread_time()
    with pytest.raises(TooManyElements, match="more than 199900 elements and items"):
        check_dataset(io.BytesIO(data), syntax, ordered=True, max_elements=199_900)
    spent = time.thread_time() - started
    assert spent < 0.5, spent  # about 0.1 s: some 0.5 s of CPU per million items
    assert check_dataset(io.BytesIO(data), syntax, ordered=True, max_elements=201_000).elements < 1000
    assert check_dataset(io.BytesIO(data), syntax, max_elements=NO_LIMIT).elements < 1000  # a sender's own file
    with pytest.raises(TooManyElements):
        check_dataset_bytes(data, syntax, ordered=True, max_elements=199_900)
    with pytest.raises(TooManyElements):
        check_dataset_bytes(data, syntax, ordered=True, budget=5000, max_elements=4000)
    assert MAX_ELEMENTS >= 4_000_000  # generous: real instances have up to a few hundred thousand
