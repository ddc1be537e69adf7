"""Instances written on the event loop (``filewriter.InlineWrites``).

PS3.4 B.2.3: success only once the instance is stored. A small instance whose data set
arrived whole is placed by the loop itself (a new ``.partial`` file, ``writev``,
rename) when such writes are fast; a large one spooled past the threshold is written
by the loop piece by piece as it arrives, then closed and renamed there too. While
inline writes are slow, the work goes to the association's writer thread. Either way
the final name only ever holds a complete file, and a full or read-only disk answers
0xA700 leaving nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from test_integrity import remount, small_tmpfs
from test_receive_path import (
    CT_CLASS,
    VERIFICATION,
    dataset_part,
    sent_intact,
    storage_scp,
    storescu,
    write_instances,
    write_large_instances,
)

from dimse_async import AE
from dimse_async.filewriter import InlineWrites
from dimse_async.services import spool as spool_module
from dimse_async.services import storage as storage_module
from dimse_async.services.storage import DirectoryStore


@contextlib.asynccontextmanager
async def store_scp(store: DirectoryStore, spool_dir: Path | None = None) -> AsyncIterator[int]:
    """A storage SCP storing with ``store``; with ``spool_dir``, data sets past 256 KiB
    are spooled there as they arrive."""
    ae = storage_scp()
    ae.on_c_store(store)
    if spool_dir is not None:
        ae.spool_threshold = 256 << 10
        ae.spool_dir = str(spool_dir)
    async with await ae.start_server("127.0.0.1", 0) as server:
        yield server.port


async def store_each(port: int, paths: list[Path]) -> list[tuple[int, str | None]]:
    """C-STORE each file over one association; (status, error comment) of each."""
    scu = AE("SCU")
    scu.add_requested_context(VERIFICATION)
    scu.add_requested_context(CT_CLASS, ExplicitVRLittleEndian)
    answers = []
    async with scu.associate("127.0.0.1", port, "SCP") as assoc:
        for path in paths:
            status = await asyncio.wait_for(assoc.c_store(path), 30)
            answers.append((int(status), status.error_comment))
        assert (await assoc.c_echo()).is_success
    return answers


def never_slow(max_size: int = 256 << 10) -> InlineWrites:
    """A policy no write counts as slow for (a loaded test machine may take 50 ms for one)."""
    return InlineWrites(max_size=max_size, slow=60.0, stall=60.0)


def left_partial(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.endswith(".partial")]


async def test_small_instances_are_placed_by_the_loop_large_ones_by_the_writer(tmp_path):
    """storescu sends 5 small instances: each is written inline (no thread job), stored
    intact under its final name. With a size limit below the instances' size they go
    to the writer thread instead, with the same result."""
    src = tmp_path / "src"
    uids = write_instances(src, 5)
    for limit, inline_writes in ((256 << 10, 5), (1000, 0)):
        out = tmp_path / f"out{limit}"
        store = DirectoryStore(out, inline=never_slow(limit))
        async with store_scp(store) as port:
            assert await storescu(port, src) == 0
        assert store.inline is not None and store.inline.writes == inline_writes
        assert store.stored == 5
        for i, uid in enumerate(uids):
            assert sent_intact((out / f"{uid}.dcm").read_bytes(), src / f"{i:03d}.dcm")
        assert left_partial(out) == []


async def test_slow_inline_writes_send_the_next_ones_to_the_writer_thread(tmp_path):
    """Inline writes that count as slow (here: any, ``slow=0``) pause inline writing:
    the first instance is written inline, the other four by the writer thread, all
    stored intact; ``inline=False`` never writes inline."""
    src = tmp_path / "src"
    uids = write_instances(src, 5)
    slow = InlineWrites(slow=0.0, backoff=60.0)
    for store in (DirectoryStore(tmp_path / "a", inline=slow), DirectoryStore(tmp_path / "b", inline=False)):
        async with store_scp(store) as port:
            assert await storescu(port, src) == 0
        assert store.stored == 5
        for i, uid in enumerate(uids):
            assert sent_intact((store.root / f"{uid}.dcm").read_bytes(), src / f"{i:03d}.dcm")
    assert (slow.writes, slow.pauses) == (1, 1)


def test_inline_write_policy_pauses_on_slow_writes_and_resumes_on_a_fast_one():
    """The policy alone: fast writes keep inline writing on; an average above ``slow``
    or one write above ``stall`` pauses it for ``backoff`` s; the first write after the
    pause decides: slow doubles the next pause, fast resumes."""
    # A pause long enough that no scheduling delay between two statements of this test
    # (tens of ms on a loaded machine) ends it unseen.
    policy = InlineWrites(max_size=100, slow=0.005, stall=0.05, backoff=0.5)
    assert policy.allowed(100) and not policy.allowed(101)
    for _ in range(50):
        policy.took(0.001)  # fast, however many
    assert policy.allowed(10) and policy.pauses == 0
    policy.took(0.02)  # one outlier: the average stays below 5 ms
    assert policy.allowed(10) and policy.pauses == 0
    for _ in range(8):
        if not policy.allowed(10):
            break
        policy.took(0.02)  # slow as a rule now
    assert not policy.allowed(10) and policy.pauses == 1

    def wait_allowed(limit: float) -> float:
        t0 = time.monotonic()
        while not policy.allowed(10):
            assert time.monotonic() - t0 < limit, "the pause did not end"
            time.sleep(0.005)
        return time.monotonic() - t0

    wait_allowed(5.0)
    policy.took(0.02)  # slow again after the pause: paused twice as long
    assert not policy.allowed(10) and policy.pauses == 2
    assert wait_allowed(5.0) >= 0.5  # 1 s, less the time since took()
    policy.took(0.001)  # fast: inline again, with no pause pending
    assert policy.allowed(10)
    policy.took(0.06)  # one stall is enough
    assert not policy.allowed(10) and policy.pauses == 3


async def test_disk_full_on_the_inline_path_answers_out_of_resources_and_leaves_nothing(tmp_path):
    """The store's directory is a 200 KB tmpfs: instances are written inline until it
    is full; the rest are answered 0xA700 with the reason, no partial file is left,
    every stored file is complete; once there is room the same instances are stored."""
    src = tmp_path / "src"
    uids = write_instances(src, 8)
    paths = [src / f"{i:03d}.dcm" for i in range(8)]
    with small_tmpfs(tmp_path / "out", "200k") as out:
        store = DirectoryStore(out, inline=never_slow())
        async with store_scp(store) as port:
            answers = await store_each(port, paths)
            stored = [i for i, (code, _) in enumerate(answers) if code == 0]
            failed = [i for i, (code, _) in enumerate(answers) if code != 0]
            assert stored and failed, answers
            for i in failed:
                code, comment = answers[i]
                assert code == 0xA700 and comment and comment.startswith("Out of resources"), answers[i]
            assert store.inline is not None and store.inline.writes == 8  # all on the inline path
            assert left_partial(out) == []
            assert sorted(p.name for p in out.iterdir()) == sorted(f"{uids[i]}.dcm" for i in stored)
            for i in stored:
                assert sent_intact((out / f"{uids[i]}.dcm").read_bytes(), paths[i])

            remount(out, "size=4m")
            assert [code for code, _ in await store_each(port, [paths[i] for i in failed])] == [0] * len(failed)
        assert left_partial(out) == []
        for uid, path in zip(uids, paths):
            assert sent_intact((out / f"{uid}.dcm").read_bytes(), path)


async def test_read_only_directory_on_the_inline_path_answers_out_of_resources(tmp_path):
    """The store's directory is read-only: the inline write cannot create its file and
    the instance is answered 0xA700; writable again, it is stored."""
    src = tmp_path / "src"
    (uid,) = write_instances(src, 1)
    with small_tmpfs(tmp_path / "out", "1m") as out:
        store = DirectoryStore(out, inline=never_slow())
        remount(out, "ro")
        async with store_scp(store) as port:
            ((code, comment),) = await store_each(port, [src / "000.dcm"])
            assert code == 0xA700 and comment and comment.startswith("Out of resources"), comment
            assert list(out.iterdir()) == []
            remount(out, "rw")
            assert await store_each(port, [src / "000.dcm"]) == [(0, None)]
        assert store.inline is not None and store.inline.writes == 2
        assert sent_intact((out / f"{uid}.dcm").read_bytes(), src / "000.dcm")


def test_writev_all_writes_every_chunk_and_the_rest_after_a_short_write(tmp_path):
    """One ``writev`` for a small instance's chunks (bytes, bytearray, views, an empty
    one); what is left after a short write is exactly the unwritten tail."""
    from dimse_async.filewriter import _after, writev_all

    data = bytes(range(256)) * 300
    chunks = [b"head", bytearray(data[:1000]), b"", memoryview(data)[1000:50_000], data[50_000:]]
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        assert writev_all(fd, chunks) == 4 + len(data)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"head" + data
    whole = b"".join(bytes(c) for c in chunks)
    for n in (0, 3, 4, 5, 1004, 49_004, len(whole) - 1, len(whole)):
        assert b"".join(bytes(c) for c in _after(chunks, n)) == whole[n:]


def test_an_inline_write_is_judged_by_its_cpu_time_unless_the_thread_slept(monkeypatch):
    """A write during which the loop's thread never slept (no voluntary context switch)
    was only running or waiting for a CPU: its CPU time counts, so preemption on a busy
    machine does not pause inline writing. One during which it slept (the disk, a lock)
    counts with its wall time: a stall pauses inline writing as before. Writes are
    watched so only after one took more than a quarter of ``slow`` by the clock."""
    from dimse_async import filewriter

    usage = (0.0, 0)  # what the thread's (CPU s, voluntary switches) read as now
    monkeypatch.setattr(filewriter, "_thread_usage", lambda: usage)
    policy = InlineWrites(slow=0.005, stall=0.05, backoff=60.0)
    policy.done(policy.start())  # fast: timed by the clock alone
    mark = policy.start()
    time.sleep(0.003)  # above slow / 4: the next writes are watched
    policy.done(mark)
    assert policy.allowed(10) and policy.pauses == 0
    usage = (1.0, 7)
    mark = policy.start()
    time.sleep(0.06)  # 60 ms of wall time, 1 ms of CPU, never slept: preempted
    usage = (1.001, 7)
    policy.done(mark)
    assert policy.allowed(10) and policy.pauses == 0
    usage = (2.0, 7)
    mark = policy.start()
    time.sleep(0.06)  # the same, but the thread slept: a stalled write
    usage = (2.001, 8)
    policy.done(mark)
    assert not policy.allowed(10) and policy.pauses == 1
    monkeypatch.undo()
    cpu, switches = filewriter._thread_usage() or (0.0, 0)  # the real one: this thread's
    assert cpu > 0 and switches >= 0


def thread_jobs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the spool's write jobs and last-step jobs handed to the writer thread."""
    jobs: list[str] = []
    submit, place = spool_module.Spool._submit, storage_module._place_spooled

    def counted_submit(self: spool_module.Spool) -> None:
        jobs.append("write")
        submit(self)

    def counted_place(*args: Any) -> Any:
        jobs.append("place")
        return place(*args)

    monkeypatch.setattr(spool_module.Spool, "_submit", counted_submit)
    monkeypatch.setattr(storage_module, "_place_spooled", counted_place)
    return jobs


async def test_large_instances_are_written_by_the_loop_as_they_arrive(tmp_path, monkeypatch):
    """Instances past the spool threshold (0.7, 2.5 and 9 MB) are written on the loop
    piece by piece as their fragments arrive, then closed and renamed there: no write
    job and no last-step job in the writer thread, each stored byte for byte, nothing
    left in the spool directory. With ``inline=False`` the same instances take the
    writer thread, stored the same."""
    files = write_large_instances(tmp_path / "src", [700_000, 2_500_000, 9_000_000])
    for inline in (never_slow(), False):
        out = tmp_path / f"out-{bool(inline)}"
        jobs = thread_jobs(monkeypatch)
        store = DirectoryStore(out, inline=inline)
        async with store_scp(store, out / ".incoming") as port:
            assert await storescu(port, tmp_path / "src") == 0
        monkeypatch.undo()
        assert store.stored == 3
        for uid, src in files.items():
            assert dataset_part(out / f"{uid}.dcm") == dataset_part(src), src.name
        assert list((out / ".incoming").iterdir()) == []
        assert left_partial(out) == []
        if inline:
            # every piece of 128 KiB - 1 MiB: at least one per MiB past the threshold
            assert store.inline is not None and store.inline.writes >= 11, store.inline.writes
            assert jobs == []
        else:
            assert jobs.count("place") == 3 and jobs.count("write") >= 8


async def test_slow_inline_writes_send_the_rest_of_a_large_instance_to_the_writer_thread(tmp_path, monkeypatch):
    """The first piece of a 9 MB instance written on the loop counts as slow: the other
    pieces and the last step go to the writer thread, after it (the file's bytes in
    order); the instance is stored intact."""
    files = write_large_instances(tmp_path / "src", [9_000_000])
    ((uid, src),) = files.items()
    out = tmp_path / "out"
    jobs = thread_jobs(monkeypatch)
    slow = InlineWrites(slow=0.0, backoff=60.0)
    store = DirectoryStore(out, inline=slow)
    async with store_scp(store, out / ".incoming") as port:
        assert await storescu(port, tmp_path / "src") == 0
    assert (slow.writes, slow.pauses) == (1, 1)
    assert jobs.count("place") == 1 and jobs.count("write") >= 5
    assert dataset_part(out / f"{uid}.dcm") == dataset_part(src)
    assert list((out / ".incoming").iterdir()) == [] and left_partial(out) == []


async def test_disk_full_while_a_large_instance_is_written_inline_answers_out_of_resources(tmp_path):
    """The store is a 1 MB tmpfs holding its own spool directory: a 2.5 MB instance
    written on the loop as it arrives fills it; it is answered 0xA700 with the reason,
    its temporary file is removed, the association goes on (a small instance is
    stored next), and once there is room the large one is stored intact."""
    files = write_large_instances(tmp_path / "src", [2_500_000])
    ((uid, src),) = files.items()
    (small_uid,) = write_instances(tmp_path / "small", 1)
    with small_tmpfs(tmp_path / "out", "1m") as out:
        store = DirectoryStore(out, inline=never_slow())
        async with store_scp(store, out / ".incoming") as port:
            answers = await store_each(port, [src, tmp_path / "small" / "000.dcm"])
            (code, comment), second = answers
            assert code == 0xA700 and comment and comment.startswith("Out of resources"), answers
            assert second == (0, None)
            assert list((out / ".incoming").iterdir()) == [] and left_partial(out) == []
            assert sorted(p.name for p in out.iterdir() if p.is_file()) == [f"{small_uid}.dcm"]
            remount(out, "size=8m")
            assert await store_each(port, [src]) == [(0, None)]
        assert dataset_part(out / f"{uid}.dcm") == dataset_part(src)
        assert list((out / ".incoming").iterdir()) == [] and left_partial(out) == []


async def test_a_spool_on_another_file_system_is_moved_by_the_writer_thread(tmp_path, monkeypatch):
    """The rename of a spool file written on the loop fails as across file systems
    (EXDEV): the writer thread copies it into place instead; stored intact, no spool
    file or temporary file left."""
    import errno

    files = write_large_instances(tmp_path / "src", [2_500_000])
    ((uid, src),) = files.items()
    out = tmp_path / "out"
    spool_dir = out / ".incoming"
    real_replace = os.replace
    refused: list[str] = []

    def replace(a: Any, b: Any) -> None:
        if os.fspath(a).startswith(str(spool_dir)):
            refused.append(os.fspath(a))
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    store = DirectoryStore(out, inline=never_slow())
    async with store_scp(store, spool_dir) as port:
        assert await storescu(port, tmp_path / "src") == 0
    assert len(refused) == 2  # on the loop, then in the writer thread before the copy
    assert dataset_part(out / f"{uid}.dcm") == dataset_part(src)
    assert list(spool_dir.iterdir()) == [] and left_partial(out) == []


def test_a_spool_written_only_on_the_loop_is_removed_by_discard(tmp_path):
    """A spool without a writer whose pieces all went on the loop: ``discard`` closes and
    removes its temporary file at once (no writer thread to do it)."""
    spool = spool_module.Spool(
        b"meta", threshold=0, directory=str(tmp_path), pause=lambda: None, resume=lambda: None, inline=never_slow()
    )
    spool.write(bytes(200 << 10))
    assert spool.writer is None and spool.path is not None and os.path.getsize(spool.path) == (200 << 10) + 4
    spool.discard()
    assert list(tmp_path.iterdir()) == [] and spool.path is None


@pytest.mark.parametrize("log_operations", [False, True])
async def test_success_answered_without_a_command_is_sent_and_counted_as_with_one(tmp_path, monkeypatch, log_operations):
    """The Success of an instance stored inline goes out from its encoded bytes alone
    (``answer_encoded``: no ``Command`` made) when nobody looks at the command: no
    DEBUG, no observer, operations not logged at INFO. With ``log_operations`` it takes
    ``answer`` with the ``Command``. Either way storescu's 5 instances get the same
    response bytes (the general encoder's), and the operations are counted, none left
    unfinished."""
    from dimse_async.dimse import decode_command, encode_command, encode_pdata
    from dimse_async.messaging import DIMSEMessaging
    from dimse_async.services.scp import response
    from dimse_async.status import Status

    src = tmp_path / "src"
    uids = write_instances(src, 5)
    store = DirectoryStore(tmp_path / "out", inline=never_slow())
    ae = storage_scp()
    ae.log_operations = log_operations
    ae.on_c_store(store)
    accepted: list[Any] = []
    sent: list[bytes] = []

    @ae.on_association("accepted")
    def spy(assoc: Any) -> None:
        accepted.append(assoc)
        send_pdata = assoc.fsm.send_pdata
        assoc.fsm.send_pdata = lambda data: sent.append(bytes(data)) or send_pdata(data)

    answered = []
    answer = DIMSEMessaging.answer
    monkeypatch.setattr(DIMSEMessaging, "answer", lambda self, *a: answered.append(a) or answer(self, *a))
    async with await ae.start_server("127.0.0.1", 0) as server:
        assert await storescu(server.port, src) == 0
        await asyncio.wait_for(accepted[0].wait_closed(), 10)
    assert len(answered) == (5 if log_operations else 0) and store.stored == 5
    (assoc,) = accepted
    context = assoc.context_for(CT_CLASS, as_scp=True).id
    responses = [decode_command(pdu[12:]) for pdu in sent if pdu[11] == 3]  # (one command PDV per PDU)
    assert sorted(r.affected_sop_instance_uid or "" for r in responses) == sorted(uids)
    for pdu, rsp in zip(sent, responses):  # each the general encoder's bytes for the request it answers
        rq = storage_module.Command(
            0x0001,
            message_id=rsp.message_id_being_responded_to,
            affected_sop_class_uid=CT_CLASS,
            affected_sop_instance_uid=rsp.affected_sop_instance_uid,
        )
        assert pdu == encode_pdata(context, encode_command(response(rq, Status(0))), True, 0)
    assert assoc.oplog.operations == {"C-STORE": 5} and assoc.oplog.summary(0.0)["ops"] == "C-STORE:5"
    assert "unfinished" not in assoc.oplog.summary(0.0)


def test_done_counts_an_unwatched_write_as_took_does(monkeypatch):
    """InlineWrites.done counts a fast write that is not watched in place (took()
    inlined): the same average, counts, back-offs and pause as took() of its duration."""
    from dimse_async import filewriter

    clock = [1024.0]
    monkeypatch.setattr(filewriter.time, "perf_counter", lambda: clock[0])
    timed, told = filewriter.InlineWrites(slow=0.004, stall=0.0008), filewriter.InlineWrites(slow=0.004, stall=0.0008)
    for ticks in [100, 900, 300, 850, 200, 900, 100] * 3:
        seconds = ticks * 2.0**-20  # (exact sums on the clock: the same float either way)
        mark = timed.start()
        assert mark[1] is None  # not watched: never slower than slow / 4 here
        clock[0] += seconds
        timed.done(mark)
        told.took(seconds)
        assert (timed._avg, timed.writes, timed.pauses, bool(timed._until), timed._pause) == (
            told._avg, told.writes, told.pauses, bool(told._until), told._pause,
        )  # fmt: skip
    assert timed.pauses and timed.writes == 21


async def test_an_operation_outliving_start_keeps_its_future_in_the_associations_tasks(tmp_path, monkeypatch):
    """The future a service's ``start`` gets (``DIMSEMessaging._start_inline``): an
    instance written on the loop is answered within ``start`` and leaves it pending, in
    no task set, for the next operation (the same future); one whose file goes to the
    writer thread keeps it in the association's tasks (cancelled when the association
    ends, awaited before a release) until answered, and the next operation gets a new
    one. storescu's 6 instances, every other one to the writer: all stored intact, each
    future handed off resolved, none left in the tasks."""
    src = tmp_path / "src"
    uids = write_instances(src, 6)
    store = DirectoryStore(tmp_path / "out", inline=never_slow())
    calls = 0
    write_file_inline = storage_module.write_file_inline

    def every_other(dest: str, chunks: Any) -> bool:
        nonlocal calls
        calls += 1
        return calls % 2 == 1 and write_file_inline(dest, chunks)  # False: the writer thread places it

    monkeypatch.setattr(storage_module, "write_file_inline", every_other)
    from dimse_async.messaging import DIMSEMessaging

    seen: list[tuple[Any, bool, bool]] = []  # (future, in the tasks after _start_inline, done then)
    assocs: list[Any] = []
    given: list[Any] = []
    start, start_inline = storage_module.CStoreService.start, DIMSEMessaging._start_inline

    def spy_start(self: Any, assoc: Any, op: Any, done: Any) -> bool:
        given.append(done)
        return start(self, assoc, op, done)

    def spy_start_inline(self: Any, op: Any) -> bool:
        taken = start_inline(self, op)
        assocs.append(self)
        done = given[-1]
        seen.append((done, done in self._tasks, done.done()))
        return taken

    monkeypatch.setattr(storage_module.CStoreService, "start", spy_start)
    monkeypatch.setattr(DIMSEMessaging, "_start_inline", spy_start_inline)
    async with store_scp(store) as port:
        assert await storescu(port, src) == 0
        await asyncio.wait_for(assocs[0].wait_closed(), 10)
    assert store.stored == 6 and calls == 6
    for i, uid in enumerate(uids):
        assert sent_intact((store.root / f"{uid}.dcm").read_bytes(), src / f"{i:03d}.dcm")
    inline, handed = seen[0::2], seen[1::2]
    assert [(in_tasks, done) for _, in_tasks, done in inline] == [(False, False)] * 3
    assert [in_tasks for _, in_tasks, _ in handed] == [True] * 3
    assert all(future.done() and not future.cancelled() for future, _, _ in handed)
    # The spare of an operation answered within start goes to the next one; a future
    # handed off is that operation's alone.
    assert inline[0][0] is handed[0][0] and inline[1][0] is handed[1][0] and inline[2][0] is handed[2][0]
    assert len({id(future) for future, _, _ in handed}) == 3
    assert not assocs[0]._tasks


async def test_the_first_requests_put_their_services_in_the_dispatch_table(tmp_path):
    """A server's C-ECHO and C-STORE entries are stand-ins until the first such request
    loads the services (a sender never loads them); each first request then puts its
    service in the stand-in's place, so the next ones call its ``start`` directly."""
    from dimse_async import ae as ae_module
    from dimse_async.services.verification import EchoService

    src = tmp_path / "src"
    write_instances(src, 2)
    store = DirectoryStore(tmp_path / "out", inline=never_slow())
    scp = storage_scp()
    scp.on_c_store(store)
    accepted: list[Any] = []
    scp.on_association("accepted")(accepted.append)
    async with await scp.start_server("127.0.0.1", 0) as server:
        assert await storescu(server.port, src) == 0
        dispatch = accepted[0].settings.dispatch
        assert type(dispatch[0x0001]) is storage_module.CStoreService
        assert type(dispatch[0x0030]) is ae_module._FirstRequest  # no C-ECHO yet
        assert await storescu(server.port, src) == 0  # (the service itself takes them)
        assert store.stored == 4
        scu = AE("SCU")
        scu.add_requested_context(VERIFICATION)
        async with scu.associate("127.0.0.1", server.port, "SCP") as assoc:
            assert (await assoc.c_echo()).is_success
            assert (await assoc.c_echo()).is_success
        assert type(dispatch[0x0030]) is EchoService
