#!/usr/bin/python3
"""Wait for an NBD server on a unix socket and time its first completed read.

    nbdprobe.py SOCKET [--timeout S] [--length 4096]

Polls every 2 ms until the socket accepts an NBD connection, then reads
LENGTH bytes at offset 0. Prints the CLOCK_REALTIME nanoseconds at which the
read was answered, so the caller can subtract its own start time. Needs the
libnbd Python bindings (Debian python3-libnbd).
"""

import argparse
import os
import sys
import time

import nbd


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()

    deadline = time.monotonic() + args.timeout
    last_error = None
    while time.monotonic() < deadline:
        if os.path.exists(args.socket):
            handle = nbd.NBD()
            try:
                handle.connect_unix(args.socket)
                handle.pread(args.length, 0)
                print(time.time_ns())
                handle.shutdown()
                return 0
            except nbd.Error as err:
                last_error = err
        time.sleep(0.002)
    print(f"nbdprobe: no completed read from {args.socket} within {args.timeout} s: {last_error}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
