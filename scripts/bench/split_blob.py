#!/usr/bin/env python3
"""Split an eStargz blob into two gzip streams at the member boundary nearest its middle.

    split_blob.py BLOB FIRST SECOND

Reads the footer for the TOC offset, the TOC for the member offsets, and
writes BLOB[:cut] and BLOB[cut:]. Each part is a sequence of whole gzip
members, so `gzip -dc` decompresses each on its own. Prints the cut offset.
"""

import io
import json
import sys
import tarfile
import zlib


def main():
    blob_path, first, second = sys.argv[1:4]
    with open(blob_path, "rb") as f:
        data = f.read()
    footer = data[-51:]
    if footer[12:14] != b"SG" or footer[32:38] != b"STARGZ":
        sys.exit(f"split_blob: {blob_path} has no eStargz footer")
    toc_offset = int(footer[16:32], 16)
    toc_tar = zlib.decompressobj(31).decompress(data[toc_offset:len(data) - 51])
    with tarfile.open(fileobj=io.BytesIO(toc_tar)) as tar:
        toc = json.load(tar.extractfile("stargz.index.json"))
    offsets = sorted({e["offset"] for e in toc["entries"] if e.get("offset")} | {toc_offset})
    cut = min(offsets, key=lambda o: abs(o - len(data) // 2))
    with open(first, "wb") as f:
        f.write(data[:cut])
    with open(second, "wb") as f:
        f.write(data[cut:])
    print(cut)


if __name__ == "__main__":
    main()
