"""spectralmc_server.ipc.framing: frames of pickle protocol 5 with numpy arrays out of
band, over AF_UNIX socketpairs, read by the blocking receiver and by the asyncio
FrameProtocol (fed by hand in chunks of every size, and end to end against a thread)."""

from __future__ import annotations

import asyncio
import datetime as dt
import pickle
import random
import socket
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from spectralmc_server.ipc.framing import (
    HEADER,
    MAGIC,
    FrameProtocol,
    ProtocolError,
    connect,
    encode,
    recv_frame,
    send_frame,
)
from spectralmc_server.ipc.unpickling import engine_side_allow, http_side_allow, loads

ROOT = Path(__file__).resolve().parent.parent.parent
Array = npt.NDArray[Any]


@dataclass
class Job:
    """A price job as columns, the shape of what the HTTP process will send."""

    ids: list[str]
    spot: Array
    call: Array
    counts: Array
    asof: dt.datetime
    extra: dict[str, Any] = field(default_factory=dict)


def allow(module: str, name: str) -> bool:
    """The engine's policy plus this test module (its dataclass)."""
    return module == Job.__module__ or engine_side_allow(module, name)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(60)
    b.settimeout(60)
    yield a, b
    a.close()
    b.close()


def floats(n: int, seed: int = 0) -> npt.NDArray[np.float64]:
    """Random float64 with the awkward values in: NaN, +-inf, -0.0, subnormals."""
    x = np.random.default_rng(seed).standard_normal(n)
    special = [np.nan, np.inf, -np.inf, -0.0, 5e-324, np.finfo(np.float64).max]
    x[: min(n, len(special))] = special[: min(n, len(special))]
    return x


def assert_same(sent: Array, got: Any) -> None:
    """Same dtype, shape and bits; the received array is writable and its own memory."""
    assert isinstance(got, np.ndarray)
    assert got.dtype == sent.dtype and got.shape == sent.shape
    assert got.tobytes() == sent.tobytes()
    assert got.flags.writeable
    assert not np.shares_memory(got, sent)


def sample_job(n: int = 50) -> Job:
    rng = np.random.default_rng(1)
    return Job(
        ids=[f"c{i:06d}" for i in range(n)],
        spot=floats(n),
        call=rng.random(n) < 0.5,
        counts=rng.integers(-(2**62), 2**62, n, dtype=np.int64),
        asof=dt.datetime(2026, 11, 26, 16, 0, 0, 123456, tzinfo=dt.UTC),
        extra={"note": "ü", "nested": [1, 2.5, None, (3, "x")], "day": dt.date(2027, 6, 18)},
    )


def check_job(sent: Job, got: Any) -> None:
    assert isinstance(got, Job)
    assert got.ids == sent.ids and got.asof == sent.asof and got.extra == sent.extra
    for name in ("spot", "call", "counts"):
        assert_same(getattr(sent, name), getattr(got, name))


# -- the blocking side -------------------------------------------------------------------


def test_dataclass_with_arrays_round_trips(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    job = sample_job()
    size = send_frame(a, job)
    got = recv_frame(b, allow=allow)
    check_job(job, got)
    assert isinstance(got, Job)
    got.spot[:] = 1.0  # writable, and the sender's array is untouched
    assert np.isnan(job.spot[0])
    assert size == sum(len(p) for p in encode(job))
    assert len(encode(job)) == 2 + 3  # header, pickle, one out-of-band buffer per array


def test_plain_dict_passes_the_http_side_policy(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    msg: dict[str, Any] = {
        "values": floats(10),
        "learned": np.ones(10, dtype=bool),
        "at": dt.datetime.now(dt.UTC),
        "id": 7,
    }
    send_frame(a, msg)
    got = recv_frame(b, allow=http_side_allow)
    assert isinstance(got, dict) and got.keys() == msg.keys()
    assert_same(msg["values"], got["values"])
    assert_same(msg["learned"], got["learned"])
    assert got["at"] == msg["at"] and got["id"] == 7


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12.0).reshape(3, 4)[:, ::2],  # non-contiguous: numpy pickles it in-band
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.array(2.5),  # 0-d
        np.array(True),
        np.array(-(2**63), dtype=np.int64),
        np.empty(0),
        np.empty((0, 3), dtype=np.int64),
        np.empty(0, dtype=bool),
        np.arange(24, dtype=np.int64).reshape(2, 3, 4),
    ],
    ids=["strided", "fortran", "0d", "0d-bool", "0d-int", "empty", "empty-2d", "empty-bool", "3d"],
)
@pytest.mark.parametrize("out_of_band", [True, False], ids=["oob", "inband"])
def test_array_shapes_round_trip(pair: tuple[socket.socket, socket.socket], array: Array, out_of_band: bool) -> None:
    a, b = pair
    send_frame(a, {"a": array, "scalar": np.float64(1.5)}, out_of_band=out_of_band)
    got = recv_frame(b, allow=http_side_allow)
    assert isinstance(got, dict)
    assert_same(array, got["a"])
    assert got["scalar"] == 1.5 and isinstance(got["scalar"], np.float64)


def test_in_band_frames_carry_no_buffers(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    job = sample_job()
    parts = encode(job, out_of_band=False)
    assert len(parts) == 2 and struct.unpack_from("<I", parts[0], 8)[0] == 0
    send_frame(a, job, out_of_band=False)
    check_job(job, recv_frame(b, allow=allow))


@pytest.mark.parametrize("count", [200, 3000])  # 3,000 parts: more than sendmsg's 1,024 per call
def test_many_buffers(pair: tuple[socket.socket, socket.socket], count: int) -> None:
    a, b = pair
    arrays = [floats(i % 17, seed=i) if i % 3 else np.arange(i % 5, dtype=np.int64) for i in range(count)]
    sender = threading.Thread(target=send_frame, args=(a, arrays))
    sender.start()
    got = recv_frame(b, allow=http_side_allow)
    sender.join()
    assert isinstance(got, list) and len(got) == count
    for s, g in zip(arrays, got, strict=True):
        assert_same(s, g)


def test_large_buffer_from_a_thread(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    big = floats(8 * 1024 * 1024)  # 64 MiB
    sizes: list[int] = []
    sender = threading.Thread(target=lambda: sizes.append(send_frame(a, {"big": big, "tail": np.arange(3)})))
    sender.start()
    got = recv_frame(b, allow=http_side_allow)
    sender.join()
    assert isinstance(got, dict)
    assert_same(big, got["big"])
    assert_same(np.arange(3), got["tail"])
    assert sizes[0] > big.nbytes


def test_clean_eof_and_eof_mid_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError):
        recv_frame(b)
    frame = b"".join(bytes(p) for p in encode({"x": floats(100)}))
    for cut in (1, HEADER.size - 1, HEADER.size + 3, len(frame) - 1):
        c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with c, d:
            c.sendall(frame[:cut])
            c.shutdown(socket.SHUT_WR)
            with pytest.raises(ProtocolError, match="mid-frame"):
                recv_frame(d, allow=http_side_allow)


def header(
    magic: int = MAGIC, meta_len: int = 10, nbufs: int = 0, flags: int = 0, lengths: tuple[int, ...] = ()
) -> bytes:
    return HEADER.pack(magic, meta_len, nbufs, flags) + struct.pack(f"<{len(lengths)}Q", *lengths)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (header(meta_len=2**32 - 1), "above the limit"),  # a 4 GiB pickle
        (header(nbufs=2**32 - 1), "above the limit"),  # 32 GiB of lengths
        (header(nbufs=2, lengths=(2**60, 8)), "above the limit"),
        (header(nbufs=1, lengths=(2**30,)), "above the limit"),  # just over 1 GiB in all
        (header(magic=0xDEADBEEF), "bad magic"),
        (b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
        (header(flags=1), "unknown frame flags"),
    ],
    ids=["meta-4GiB", "nbufs-4G", "buffer-2**60", "just-over-1GiB", "magic", "http", "flags"],
)
def test_malformed_headers_are_refused_before_allocating(
    pair: tuple[socket.socket, socket.socket], raw: bytes, match: str
) -> None:
    a, b = pair
    a.sendall(raw + b"\0" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=match):
            recv_frame(b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    # the asyncio receiver refuses the same bytes, just as cheaply
    lost: list[Exception | None] = []
    proto = FrameProtocol(lambda m: None, lost.append)
    tracemalloc.start()
    try:
        feed(proto, raw + b"\0" * 64, [len(raw) + 64])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(lost) == 1 and isinstance(lost[0], ProtocolError) and match in str(lost[0])
    assert peak < 1 << 20


def test_a_smaller_frame_limit(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    msg = {"x": floats(1000)}  # about 8 KB
    send_frame(a, msg)
    with pytest.raises(ProtocolError, match="above the limit of 4000"):
        recv_frame(b, max_frame_bytes=4000)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with c, d:
        send_frame(c, msg)
        got = recv_frame(d, allow=http_side_allow, max_frame_bytes=sum(len(p) for p in encode(msg)))  # exactly fits
        assert isinstance(got, dict)
        assert_same(msg["x"], got["x"])


# -- the allow-lists ---------------------------------------------------------------------


def test_torch_tensor_refused_on_the_http_side(pair: tuple[socket.socket, socket.socket]) -> None:
    import torch

    a, b = pair
    send_frame(a, {"t": torch.ones(3)})
    with pytest.raises(pickle.UnpicklingError, match=r"refused to unpickle torch\."):
        recv_frame(b, allow=http_side_allow)
    send_frame(a, {"t": torch.ones(3)})
    with pytest.raises(pickle.UnpicklingError, match=r"refused to unpickle torch\."):
        recv_frame(b, allow=engine_side_allow)
    send_frame(a, {"after": np.arange(3)})  # the refused frames were read whole: the stream is in step
    got = recv_frame(b, allow=http_side_allow)
    assert isinstance(got, dict)
    assert_same(np.arange(3), got["after"])


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("spectralmc_server.engine.pricer", "ServedModel"),  # would import torch
        ("torch", "ones"),
        ("torchvision.ops", "nms"),
        ("os", "system"),
        ("builtins", "getattr"),
        ("builtins", "eval"),
        ("numpy", "load"),
        ("subprocess", "Popen"),
    ],
)
def test_http_side_refuses(module: str, name: str) -> None:
    assert not http_side_allow(module, name)
    with pytest.raises(pickle.UnpicklingError, match=f"refused to unpickle {module}.{name}"):
        loads(f"c{module}\n{name}\n.".encode(), [], allow=http_side_allow)


@pytest.mark.parametrize(
    ("module", "name", "http", "engine"),
    [
        ("spectralmc_server.ipc.framing", "ProtocolError", True, True),
        ("spectralmc_server.pricing.schemas", "Contract", True, True),
        ("spectralmc_server.pricing.book", "Book", True, True),
        ("spectralmc_server.pricingx", "Anything", False, True),
        ("spectralmc_server.engine.pricer", "ServedModel", False, True),
        ("spectralmc_server.service.app", "App", False, True),
        ("numpy._core.numeric", "_frombuffer", True, True),
        ("numpy.core.multiarray", "_reconstruct", True, True),
        ("numpy", "dtype", True, True),
        ("datetime", "datetime", True, True),
        ("collections", "OrderedDict", True, True),
        ("builtins", "ValueError", True, True),
        ("builtins", "set", True, True),
        ("pydantic.networks", "AnyUrl", True, True),
        ("torch._utils", "_rebuild_tensor_v2", False, False),
        ("os", "system", False, False),
    ],
)
def test_policies(module: str, name: str, http: bool, engine: bool) -> None:
    assert http_side_allow(module, name) is http
    assert engine_side_allow(module, name) is engine


def test_dunder_steps_are_refused_whatever_the_policy() -> None:
    with pytest.raises(pickle.UnpicklingError, match="__globals__"):
        loads(b"cspectralmc_server.ipc.framing\nloads.__globals__\n.", [], allow=lambda m, n: True)


def test_trailing_bytes_after_the_pickle_are_refused() -> None:
    meta = pickle.dumps({"a": 1}, protocol=5)
    assert loads(meta, [], allow=http_side_allow) == {"a": 1}
    with pytest.raises(pickle.UnpicklingError, match="trailing"):
        loads(meta + b"junk", [], allow=http_side_allow)


def test_pydantic_model_round_trips_on_the_engine_side(pair: tuple[socket.socket, socket.socket]) -> None:
    from spectralmc_server.pricing.schemas import Contract

    a, b = pair
    contract = Contract.model_validate(
        {"id": "q1", "right": "call", "strike": 100.0, "underlying": "X", "expiry": "2027-06-18"}
    )
    send_frame(a, [contract])
    assert recv_frame(b, allow=engine_side_allow) == [contract]


def test_the_module_and_a_round_trip_load_no_torch() -> None:
    code = (
        "import socket, sys, numpy as np\n"
        "from spectralmc_server.ipc.framing import recv_frame, send_frame\n"
        "from spectralmc_server.ipc.unpickling import http_side_allow\n"
        "a, b = socket.socketpair(socket.AF_UNIX)\n"
        "send_frame(a, {'x': np.arange(5.0)})\n"
        "assert recv_frame(b, allow=http_side_allow)['x'].sum() == 10.0\n"
        "bad = [m for m in sys.modules if m.startswith(('torch', 'spectralmc_server.engine'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


# -- FrameProtocol fed by hand -----------------------------------------------------------


def feed(proto: FrameProtocol, data: bytes, chunks: Iterable[int]) -> None:
    """Deliver ``data`` the way an asyncio transport does: ask for a buffer, copy at most
    the next chunk's size into it, report how much arrived."""
    pos = 0
    sizes = iter(chunks)
    while pos < len(data):
        buf = proto.get_buffer(-1)
        assert len(buf) > 0
        k = min(len(buf), next(sizes), len(data) - pos)
        buf[:k] = data[pos : pos + k]
        proto.buffer_updated(k)
        pos += k


def frames(*msgs: object) -> bytes:
    return b"".join(bytes(p) for m in msgs for p in encode(m))


def test_protocol_assembles_frames_from_chunks_of_random_sizes() -> None:
    job = sample_job(300)
    many = [floats(i % 9, seed=i) for i in range(200)]
    big = floats(300_000)  # 2.4 MB: read straight into place past the first 64 KiB
    small: list[object] = [job, many, {"empty": np.empty(0)}, "done"]
    full: list[object] = [job, many, {"big": big, "after": np.arange(4)}, {"empty": np.empty(0)}, "done"]
    rng = random.Random(7)
    # (messages, largest random chunk): one byte at a time (the small messages only, for
    # time), then a mix of 1-byte chunks and random ones up to a bound
    for msgs, top in [(small, 1), (small, 2), (small, 17), (full, 1000), (full, 70_000), (full, 1 << 30)]:
        data = frames(*msgs)
        chunks = (rng.choice([1, rng.randint(1, top)]) for _ in range(len(data)))
        got: list[object] = []
        lost: list[Exception | None] = []
        proto = FrameProtocol(got.append, lost.append, allow=allow)
        feed(proto, data, chunks)
        assert not lost
        assert len(got) == len(msgs)
        check_job(job, got[0])
        assert isinstance(got[1], list)
        for s, g in zip(many, got[1], strict=True):
            assert_same(s, g)
        if msgs is full:
            assert isinstance(got[2], dict)
            assert_same(big, got[2]["big"])
            assert_same(np.arange(4), got[2]["after"])
        assert isinstance(got[-2], dict)
        assert_same(np.empty(0), got[-2]["empty"])
        assert got[-1] == "done"
        proto.eof_received()
        proto.connection_lost(None)
        assert lost == [None]  # EOF between frames is clean


def test_protocol_eof_mid_frame() -> None:
    data = frames({"x": floats(100)})
    for cut in (1, HEADER.size, HEADER.size + 5, len(data) - 1):
        lost: list[Exception | None] = []
        proto = FrameProtocol(lambda m: pytest.fail("no message expected"), lost.append)
        feed(proto, data[:cut], [cut])
        assert proto.eof_received() is False
        proto.connection_lost(None)
        assert len(lost) == 1 and isinstance(lost[0], ProtocolError)


def test_protocol_refused_global_and_failing_callback_are_reported_once() -> None:
    lost: list[Exception | None] = []
    got: list[object] = []
    proto = FrameProtocol(got.append, lost.append, allow=http_side_allow)
    feed(proto, frames(1, sample_job(3), 2), [1 << 20])
    assert got == [1]
    assert len(lost) == 1 and isinstance(lost[0], pickle.UnpicklingError)
    proto.connection_lost(None)
    assert len(lost) == 1

    def boom(msg: object) -> None:
        raise RuntimeError("consumer bug")

    lost.clear()
    proto = FrameProtocol(boom, lost.append)
    feed(proto, frames(1), [1 << 20])
    assert len(lost) == 1 and isinstance(lost[0], RuntimeError)


# -- asyncio end to end ------------------------------------------------------------------


def echo(sock: socket.socket) -> None:
    """A blocking peer: send back every message until EOF."""
    while True:
        try:
            msg = recv_frame(sock, allow=allow)
        except EOFError:
            return
        send_frame(sock, msg)


async def test_asyncio_side_against_a_blocking_thread() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(60)
    peer = threading.Thread(target=echo, args=(b,), daemon=True)
    peer.start()
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[object] = asyncio.Queue()
    lost: asyncio.Future[Exception | None] = loop.create_future()
    proto = await connect(a, inbox.put_nowait, lost.set_result, allow=allow)
    job = sample_job(1000)
    many = [np.arange(i, dtype=np.int64) for i in range(200)]
    big = floats(1 << 20)  # 8 MiB: above the transport's high water mark, so send() waits for the drain
    msgs: list[object] = [job, {"many": many}, {"big": big}, "ping", job]
    for msg in msgs:
        await proto.send(msg)
    echoed = [await asyncio.wait_for(inbox.get(), 30) for _ in msgs]
    check_job(job, echoed[0])
    check_job(job, echoed[4])
    assert isinstance(echoed[1], dict) and isinstance(echoed[2], dict)
    for s, g in zip(many, echoed[1]["many"], strict=True):
        assert_same(s, g)
    assert_same(big, echoed[2]["big"])
    assert echoed[3] == "ping"
    # one at a time as well (request, reply), as the HTTP process will mostly do
    for i in range(50):
        await proto.send({"i": i, "x": floats(i)})
        reply = await asyncio.wait_for(inbox.get(), 30)
        assert isinstance(reply, dict) and reply["i"] == i
        assert_same(floats(i), reply["x"])
    assert proto.transport is not None
    proto.transport.close()
    assert await asyncio.wait_for(lost, 30) is None
    await asyncio.to_thread(peer.join, 30)
    assert not peer.is_alive()
    b.close()
    with pytest.raises(ConnectionResetError):
        await proto.send("late")


async def test_asyncio_side_sees_the_peer_vanish_mid_frame() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    loop = asyncio.get_running_loop()
    lost: asyncio.Future[Exception | None] = loop.create_future()
    await connect(a, lambda m: None, lost.set_result)
    b.sendall(frames({"x": floats(10)})[:-3])
    b.close()
    exc = await asyncio.wait_for(lost, 30)
    assert isinstance(exc, ProtocolError)
