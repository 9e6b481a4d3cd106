#!/usr/bin/env python3
"""TCP proxy that adds a fixed one-way delay in each direction, for WAN emulation.

    wanproxy.py --listen 127.0.0.1:PORT --connect HOST:PORT [--delay-ms 10]
                [--netns NAME] [--ready-file F]

Each chunk read from one side is written to the other side `--delay-ms`
milliseconds later, so a request and its response see 2 x delay of round-trip
time while bulk transfers keep their throughput (chunks are queued, not sent
one at a time). Opening the upstream connection waits one extra round trip,
as a TCP handshake would. With `--netns NAME` the listening socket stays in
the current network namespace and the upstream connections are made from the
named namespace (/run/netns/NAME), so traffic from 127.0.0.1 crosses a veth
into a namespace created by the harness.
"""

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import sys

CLONE_NEWNET = 0x40000000
CHUNK_BYTES = 256 * 1024


def enter_netns(name):
    """Move this (single-threaded) process into network namespace NAME."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


async def pump(reader, writer, delay):
    """Copy READER to WRITER, delivering each chunk DELAY seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def receive():
        while True:
            data = await reader.read(CHUNK_BYTES)
            await queue.put((loop.time() + delay, data))
            if not data:
                return

    async def deliver():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(receive(), deliver())
    except (ConnectionError, OSError):
        pass


async def handle(client_reader, client_writer, upstream, delay):
    host, port = upstream
    try:
        # The handshake of a real connection costs one round trip.
        await asyncio.sleep(2 * delay)
        up_reader, up_writer = await asyncio.open_connection(host, port)
    except OSError as err:
        print(f"wanproxy: connect to {host}:{port} failed: {err}", file=sys.stderr)
        client_writer.close()
        return
    await asyncio.gather(
        pump(client_reader, up_writer, delay),
        pump(up_reader, client_writer, delay),
    )
    for w in (client_writer, up_writer):
        w.close()


def split_addr(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on (loopback)")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the upstream server")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay in ms")
    parser.add_argument("--netns", help="network namespace for upstream connections")
    parser.add_argument("--ready-file", help="file written once the listener accepts")
    args = parser.parse_args()

    host, port = split_addr(args.listen)
    listener = socket.create_server((host, port), reuse_port=False)
    if args.netns:
        enter_netns(args.netns)
    delay = args.delay_ms / 1000.0
    upstream = split_addr(args.connect)
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, upstream, delay), sock=listener
    )
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
