#!/usr/bin/env python3
"""A minimal relay whose bytes never reach user space: the kernel's sockmap forwards them.

    sockmap_relay.py LISTEN_PORT TARGET_PORT      # prints "ready", relays until killed

bench/relay_floor runs two of these in a row (mode ``sockmap``) beside its splice and copy
relays. Each accepted connection and its upstream connection go into a BPF SOCKHASH, each
under the other's socket cookie; an ``sk_skb`` verdict program attached to the map
redirects every buffer a socket receives to the egress of its partner
(``bpf_sk_redirect_hash``), in the kernel, without waking this process. What the program
cannot redirect (a partner not in the map yet) it passes to this process, which forwards
it itself. A thread per direction waits for the end of the stream, waits until the
partner's counters (TCP_INFO ``bytes_acked`` plus its send queue) reach what the socket
received (``bytes_received``, which counts the FIN), then half-closes the partner.

This is a throughput probe, not a data server: it needs root (CAP_BPF and CAP_NET_ADMIN),
keeps no counters, has no back-pressure (a redirected buffer waits in the partner's
queue however long it grows: the kernel's redirect charges it to nobody), and handles the
end of a stream only as far as iperf3 needs: in a check with an echo server, streams of
1 byte to 64 KiB came back whole, but 10 MiB streams were cut short at their end. Those
are reasons enough to keep it out of the data plane, and it is slower anyway
(docs/performance.md). The BPF program is a dozen instructions, assembled here, so
nothing but Python is needed.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import select
import socket
import struct
import sys
import threading

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
NR_BPF = 321                      # x86_64
MAP_CREATE, MAP_UPDATE, MAP_DELETE, PROG_LOAD, PROG_ATTACH = 0, 2, 3, 5, 8
MAP_TYPE_SOCKHASH = 18
PROG_TYPE_SK_SKB = 14
ATTACH_SK_SKB_VERDICT = 38
HELPER_GET_SOCKET_COOKIE, HELPER_SK_REDIRECT_HASH = 46, 72
SO_COOKIE = 57
TIOCOUTQ = 0x5411


def bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    r = _libc.syscall(NR_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
    return r


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def load() -> int:
    """The SOCKHASH (cookie -> partner socket) with the verdict program attached."""
    mfd = bpf(MAP_CREATE, struct.pack("<IIII", MAP_TYPE_SOCKHASH, 8, 4, 65536))
    prog = b"".join([
        insn(0xbf, 6, 1),                              # r6 = skb
        insn(0x85, imm=HELPER_GET_SOCKET_COOKIE),      # r0 = cookie of the receiving socket
        insn(0x7b, 10, 0, -8),                         # key = r0 (on the stack)
        insn(0xbf, 1, 6),                              # r1 = skb
        insn(0x18, 2, 1, 0, mfd), insn(0),             # r2 = the map
        insn(0xbf, 3, 10), insn(0x07, 3, 0, 0, -8),    # r3 = &key
        insn(0xb7, 4, 0, 0, 0),                        # r4 = 0: to the partner's egress
        insn(0x85, imm=HELPER_SK_REDIRECT_HASH),       # r0 = SK_PASS (1) or SK_DROP (0)
        insn(0x55, 0, 0, 1, 0),                        # if r0 != 0 goto exit
        insn(0xb7, 0, 0, 0, 1),                        # not redirected: SK_PASS, to us
        insn(0x95),                                    # exit
    ])
    code, lic, log = (ctypes.create_string_buffer(prog), ctypes.create_string_buffer(b"GPL"),
                      ctypes.create_string_buffer(65536))
    attr = struct.pack("<IIQQIIQII16sII", PROG_TYPE_SK_SKB, len(prog) // 8, ctypes.addressof(code),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0, b"relay_floor", 0,
                       ATTACH_SK_SKB_VERDICT)
    try:
        pfd = bpf(PROG_LOAD, attr)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}\n{log.value.decode(errors='replace')}") from None
    bpf(PROG_ATTACH, struct.pack("<IIII", mfd, pfd, ATTACH_SK_SKB_VERDICT, 0))
    return mfd


def cookie(s: socket.socket) -> int:
    return struct.unpack("<Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def _key_op(cmd: int, mfd: int, key: int, fd: int | None = None) -> None:
    k = ctypes.create_string_buffer(struct.pack("<Q", key))
    if fd is None:
        bpf(cmd, struct.pack("<IIQ", mfd, 0, ctypes.addressof(k)))
    else:
        v = ctypes.create_string_buffer(struct.pack("<I", fd))
        bpf(cmd, struct.pack("<IIQQQ", mfd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))


def received(s: socket.socket) -> int:
    """TCP_INFO tcpi_bytes_received."""
    return struct.unpack_from("<Q", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), 128)[0]


def written(s: socket.socket) -> int:
    """Every byte queued on ``s`` so far: tcpi_bytes_acked plus what is not acked yet."""
    acked = struct.unpack_from("<Q", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), 120)[0]
    return acked + struct.unpack("i", fcntl.ioctl(s.fileno(), TIOCOUTQ, b"\0" * 4))[0]


def direction(src: socket.socket, dst: socket.socket, done: list, finish) -> None:
    poller = select.poll()
    poller.register(src, select.POLLIN | select.POLLRDHUP)
    try:
        while True:
            ev = poller.poll()[0][1]
            try:
                data = src.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if ev & (select.POLLRDHUP | select.POLLHUP):
                    break
                continue
            if not data:
                break
            dst.sendall(data)
        stall = select.poll()      # no event to wait on: poll the counters every 1 ms
        while received(src) != written(dst):
            stall.poll(1)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    done.append(src)
    if len(done) == 2:
        finish()


def main() -> int:
    listen_port, target_port = int(sys.argv[1]), int(sys.argv[2])
    mfd = load()
    ls = socket.create_server(("127.0.0.1", listen_port))
    print("ready", flush=True)
    while True:
        a, _ = ls.accept()
        b = socket.create_connection(("127.0.0.1", target_port))
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keys = [cookie(a), cookie(b)]
        try:
            _key_op(MAP_UPDATE, mfd, keys[0], b.fileno())
            _key_op(MAP_UPDATE, mfd, keys[1], a.fileno())
        except OSError as e:     # a socket that is closing already cannot join the map
            print(f"not redirected ({e.strerror}); copying", file=sys.stderr)
        for s in (a, b):          # what arrived before the socket joined the map
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

        def finish(a=a, b=b, keys=keys) -> None:
            for k in keys:
                try:
                    _key_op(MAP_DELETE, mfd, k)
                except OSError:
                    pass
            a.close()
            b.close()

        done: list = []
        threading.Thread(target=direction, args=(a, b, done, finish), daemon=True).start()
        threading.Thread(target=direction, args=(b, a, done, finish), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
