"""Frames of pickle protocol 5 over an AF_UNIX stream socket, numpy arrays out of band.

A frame, all integers little-endian::

    magic u32 | meta_len u32 | nbufs u32 | flags u32      (the 16-byte header)
    nbufs x u64                                           (each out-of-band buffer's length)
    meta_len bytes                                        (pickle.dumps(msg, protocol=5, buffer_callback=...))
    the nbufs buffers' raw bytes, in order

The sender hands the arrays' own memory to ``sendmsg`` (no copy in Python; the kernel
copies once into the socket). The receivers allocate one exact-size ``bytearray`` per
buffer and have the kernel copy straight into it, so received arrays are writable, own
their memory and never alias the sender's. Non-contiguous arrays are pickled in-band by
numpy (a copy), which is correct, only slower.

Two receivers: :func:`recv_frame` (blocking, for a thread or the engine process) and
:class:`FrameProtocol` (asyncio, for the HTTP process). Both unpickle with an allow-list
(:func:`loads`): :func:`http_side_allow` never loads torch or engine modules,
:func:`engine_side_allow` admits the server's own classes. A frame whose declared size
is above ``max_frame_bytes`` is refused before anything is allocated.

This module imports neither torch nor numpy (numpy is loaded by the unpickler when a
message holds an array).
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
import sys
from collections.abc import Callable

from spectralmc_server.ipc.unpickling import Allow, engine_side_allow, http_side_allow, loads

MAGIC = 0x31434D53  # b"SMC1" read as a little-endian u32
HEADER = struct.Struct("<IIII")  # magic, meta_len, nbufs, flags
LENGTH = struct.Struct("<Q")
MAX_FRAME_BYTES = 1 << 30
PROTOCOL = 5

_U32_MAX = 0xFFFF_FFFF
_IOV_MAX = 1024  # Linux's IOV_MAX: sendmsg takes at most this many parts per call
_STAGING_BYTES = 256 * 1024  # FrameProtocol reads small parts through this buffer...
_DIRECT_MIN = 64 * 1024  # ...and parts with at least this many bytes left straight into place
# Python 3.12+ asyncio transports keep views of unsent data instead of copying it; the
# frame's parts are then copied so that a caller may reuse its arrays once send() returns.
_TRANSPORT_KEEPS_VIEWS = sys.version_info >= (3, 12)

Part = memoryview | bytes


class ProtocolError(Exception):
    """The byte stream is not a valid frame sequence (bad magic, unknown flags, a frame
    above the size limit, or the connection closed mid-frame)."""


# -- encoding and the blocking side ------------------------------------------------------


def encode(msg: object, *, out_of_band: bool = True) -> list[Part]:
    """The frame of ``msg`` as parts: header and lengths, the pickle, then each
    out-of-band buffer as a view of the object's own memory (no copy). With
    ``out_of_band=False`` everything is pickled in-band (``nbufs`` is 0)."""
    raw: list[memoryview] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        try:
            view = buf.raw()
        except BufferError:  # a non-contiguous buffer: serialised in-band instead
            return True
        raw.append(view)
        return False

    meta = pickle.dumps(msg, protocol=PROTOCOL, buffer_callback=keep if out_of_band else None)
    if len(meta) > _U32_MAX:
        raise ValueError(f"pickled message of {len(meta)} bytes does not fit a frame (meta_len is a u32)")
    head = struct.pack(f"<IIII{len(raw)}Q", MAGIC, len(meta), len(raw), 0, *(v.nbytes for v in raw))
    return [head, meta, *raw]


def send_frame(sock: socket.socket, msg: object, *, out_of_band: bool = True) -> int:
    """Send ``msg`` as one frame on a blocking socket; return the frame's size in bytes.

    The parts go to ``sendmsg`` as they are (gather I/O, at most 1,024 per call); after a
    partial send the remaining parts are re-sliced views, never concatenated copies."""
    views = [memoryview(p) for p in encode(msg, out_of_band=out_of_band) if len(p)]
    total = sum(v.nbytes for v in views)
    i = 0
    while i < len(views):
        i = _advance(views, i, sock.sendmsg(views[i : i + _IOV_MAX]))
    return total


def _advance(views: list[memoryview], i: int, n: int) -> int:
    """After ``n`` bytes of ``views[i:]`` went through one gather/scatter call: the index
    of the first part not done, that part re-sliced to what is left of it."""
    while n:
        size = views[i].nbytes
        if n >= size:
            n -= size
            i += 1
        else:
            views[i] = views[i][n:]
            n = 0
    return i


def _check_header(head: bytes | bytearray, max_frame_bytes: int) -> tuple[int, int]:
    """(meta_len, nbufs) of a valid header; ProtocolError otherwise."""
    magic, meta_len, nbufs, flags = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:08x}: not a SpectralMC IPC frame")
    if flags:
        raise ProtocolError(f"unknown frame flags 0x{flags:08x}")
    least = HEADER.size + LENGTH.size * nbufs + meta_len
    if least > max_frame_bytes:
        raise ProtocolError(f"frame of at least {least} bytes is above the limit of {max_frame_bytes}")
    return meta_len, nbufs


def _check_lengths(block: bytes | bytearray, meta_len: int, nbufs: int, max_frame_bytes: int) -> tuple[int, ...]:
    """The buffer lengths of a frame whose total size is within the limit."""
    sizes: tuple[int, ...] = struct.unpack_from(f"<{nbufs}Q", block)
    total = HEADER.size + LENGTH.size * nbufs + meta_len + sum(sizes)
    if total > max_frame_bytes:
        raise ProtocolError(f"frame of {total} bytes is above the limit of {max_frame_bytes}")
    return sizes


def _recv_exact(sock: socket.socket, buf: bytearray, *, first: bool = False) -> None:
    with memoryview(buf) as view:
        got = 0
        while got < len(view):
            n = sock.recv_into(view[got:])
            if not n:
                if first and got == 0:
                    raise EOFError("the IPC connection was closed")
                raise ProtocolError(f"the IPC connection was closed mid-frame ({got} of {len(view)} bytes of a part)")
            got += n


def _recv_all_into(sock: socket.socket, bufs: list[bytearray]) -> None:
    """Fill every buffer, in order, with scatter reads (``recvmsg_into``): one syscall
    for all of a frame's parts when they have arrived, however many arrays it holds."""
    views = [memoryview(b) for b in bufs if len(b)]
    want = sum(v.nbytes for v in views)
    got = 0
    i = 0
    while i < len(views):
        n = sock.recvmsg_into(views[i : i + _IOV_MAX])[0]
        if not n:
            raise ProtocolError(f"the IPC connection was closed mid-frame ({got} of {want} bytes of its buffers)")
        got += n
        i = _advance(views, i, n)


def recv_frame(
    sock: socket.socket, *, allow: Allow = engine_side_allow, max_frame_bytes: int = MAX_FRAME_BYTES
) -> object:
    """Receive one frame from a blocking socket and return its message.

    EOFError: the peer closed before a frame started. ProtocolError: closed mid-frame,
    bad magic or flags, or a declared size above ``max_frame_bytes`` (checked before
    allocating). ``pickle.UnpicklingError``: a global refused by ``allow`` (the frame was
    read whole, so the stream is still in step)."""
    head = bytearray(HEADER.size)
    _recv_exact(sock, head, first=True)
    meta_len, nbufs = _check_header(head, max_frame_bytes)
    sizes: tuple[int, ...] = ()
    if nbufs:
        lengths = bytearray(LENGTH.size * nbufs)
        _recv_exact(sock, lengths)
        sizes = _check_lengths(lengths, meta_len, nbufs, max_frame_bytes)
    meta = bytearray(meta_len)
    buffers = [bytearray(size) for size in sizes]
    _recv_all_into(sock, [meta, *buffers])  # the pickle and every buffer, one read when all have arrived
    return loads(meta, buffers, allow=allow)


# -- the asyncio side --------------------------------------------------------------------


def write_frame(transport: asyncio.WriteTransport, msg: object, *, out_of_band: bool = True) -> int:
    """Write ``msg`` as one frame on an asyncio transport; return its size in bytes.

    Small parts are joined into one ``write`` (one syscall for a small message), parts of
    64 KiB or more are written as they are. The transport sends what the socket takes at
    once and copies the rest into its buffer."""
    total = 0
    small = bytearray()
    for part in encode(msg, out_of_band=out_of_band):
        n = len(part)
        total += n
        if n < _DIRECT_MIN:
            small += part
            continue
        if small:
            transport.write(small)
            small = bytearray()
        transport.write(bytes(part) if _TRANSPORT_KEEPS_VIEWS else part)
    if small:
        transport.write(small)
    return total


class FrameProtocol(asyncio.BufferedProtocol):
    """Receives frames incrementally on an asyncio stream and calls ``on_message(msg)``
    for each complete one, in order.

    Parts with 64 KiB or more still to come are read by the kernel straight into their
    destination ``bytearray`` (``get_buffer`` hands out a view of it); smaller pieces -- the
    header, small pickles and arrays, the start of a large buffer -- arrive through a
    256 KiB staging buffer and are copied from it, so a small message costs one read.

    ``on_lost(exc)`` is called exactly once: ``None`` after a clean EOF between frames
    or an orderly close, a ``ProtocolError`` for EOF mid-frame or a malformed frame,
    ``pickle.UnpicklingError`` for a refused global, the exception ``on_message`` raised,
    or the transport's own error. Every error closes the transport.
    """

    def __init__(
        self,
        on_message: Callable[[object], None],
        on_lost: Callable[[Exception | None], None],
        *,
        allow: Allow = http_side_allow,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_message = on_message
        self._on_lost = on_lost
        self._allow = allow
        self._max = max_frame_bytes
        self._staging = bytearray(_STAGING_BYTES)
        self._head = bytearray(HEADER.size)
        self._direct = False
        self._failed = False
        self._lost = False
        self._error: Exception | None = None
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        # the frame being read: the current destination and how full it is
        self._dest = self._head
        self._filled = 0
        self._in_frame = False
        self._meta_len = 0
        self._nbufs = 0
        self._block: bytearray | None = None  # the lengths and the pickle
        self._sizes: tuple[int, ...] = ()
        self._buffers: list[bytearray] = []

    # -- reading

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self._failed and len(self._dest) - self._filled >= _DIRECT_MIN:
            self._direct = True
            return memoryview(self._dest)[self._filled :]
        self._direct = False
        return memoryview(self._staging)

    def buffer_updated(self, nbytes: int) -> None:
        if self._failed:
            return
        try:
            if self._direct:
                self._in_frame = True
                self._filled += nbytes
                self._advance()
            else:
                self._consume(nbytes)
        except Exception as exc:  # a malformed frame, a refused global, on_message's own error
            self._fail(exc)

    def _consume(self, nbytes: int) -> None:
        """Copy ``nbytes`` of staging into the destinations, frame after frame."""
        with memoryview(self._staging) as src:
            pos = 0
            while pos < nbytes and not self._failed:
                take = min(nbytes - pos, len(self._dest) - self._filled)
                self._dest[self._filled : self._filled + take] = src[pos : pos + take]
                self._in_frame = True
                self._filled += take
                pos += take
                self._advance()

    def _advance(self) -> None:
        """While the destination is full, move to the next non-empty one, delivering every
        frame completed on the way."""
        while self._filled == len(self._dest) and not self._failed:
            if self._dest is self._head:
                self._meta_len, self._nbufs = _check_header(self._head, self._max)
                self._block = bytearray(LENGTH.size * self._nbufs + self._meta_len)
                self._dest = self._block
            else:
                if self._dest is self._block:
                    self._sizes = _check_lengths(self._block, self._meta_len, self._nbufs, self._max)
                else:
                    self._buffers.append(self._dest)
                self._dest = self._next_part()
            self._filled = 0

    def _next_part(self) -> bytearray:
        i = len(self._buffers)
        if i < self._nbufs:
            return bytearray(self._sizes[i])
        assert self._block is not None
        meta = memoryview(self._block)[LENGTH.size * self._nbufs :]
        buffers = self._buffers
        self._block, self._buffers, self._sizes, self._in_frame = None, [], (), False
        self._on_message(loads(meta, buffers, allow=self._allow))
        return self._head

    def eof_received(self) -> bool:
        if self._in_frame and self._error is None:
            self._error = ProtocolError("the IPC connection was closed mid-frame")
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._report_lost(self._error if self._error is not None else exc)

    def _fail(self, exc: Exception) -> None:
        if self._failed:
            return
        self._failed = True
        self._error = exc
        if self.transport is not None:
            self.transport.close()  # connection_lost reports the error
        else:
            self._report_lost(exc)

    def _report_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._failed = True
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the IPC connection was lost"))
        self._drain_waiters.clear()
        self._on_lost(exc)

    # -- writing

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    async def send(self, msg: object, *, out_of_band: bool = True) -> int:
        """Write ``msg`` as one frame and, while the transport's buffer is above its high
        water mark, wait for it to drain. Returns the frame's size in bytes; raises
        ConnectionResetError once the connection is closing or lost."""
        if self.transport is None or self._lost or self.transport.is_closing():
            raise ConnectionResetError("the IPC connection is closed")
        n = write_frame(self.transport, msg, out_of_band=out_of_band)
        if self._paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
        return n


async def connect(
    sock: socket.socket,
    on_message: Callable[[object], None],
    on_lost: Callable[[Exception | None], None],
    *,
    allow: Allow = http_side_allow,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> FrameProtocol:
    """Run a :class:`FrameProtocol` on an already connected AF_UNIX stream socket (one
    end of a socketpair); the transport takes the socket over (and makes it non-blocking)."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_unix_connection(
        lambda: FrameProtocol(on_message, on_lost, allow=allow, max_frame_bytes=max_frame_bytes), sock=sock
    )
    return protocol
