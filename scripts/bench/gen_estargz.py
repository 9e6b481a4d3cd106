#!/usr/bin/env python3
"""Write a synthetic multi-layer eStargz image as an OCI image layout.

    gen_estargz.py --entries N --layers L --out DIR [--level 1]

The N entries are split evenly over L layers. Every layer uses the same
directory names (dNNNN/, 100 entries each), so attaching the image merges
directories across layers. About 1 entry in 100 is a directory, 1 in 10 a
symlink, and the rest are regular files of 0 to 511 bytes (1 in 50 empty).

Each blob follows the eStargz layout: every non-empty regular file starts a
new gzip member, the tar header of the next entry ends the previous member,
the TOC (`stargz.index.json`, one tar entry plus the end-of-archive blocks)
is its own gzip member, and the 51-byte footer is an empty gzip member whose
extra field holds subfield "SG" with "%016x" of the TOC offset + "STARGZ".
The first entry is `.no.prefetch.landmark` (one byte, 0x0f), as the reference
writer emits when no file is prioritized. The layer descriptors carry the
`containerd.io/snapshot/stargz/toc.digest` and
`io.containers.estargz.uncompressed-size` annotations, and the config lists
the diff IDs (sha256 of each uncompressed tar).
"""

import argparse
import hashlib
import json
import os
import struct
import tarfile
import tempfile
import zlib

MTIME = 1700000000
MODTIME = "2023-11-14T22:13:20Z"
ENTRIES_PER_DIR = 100
TAR_BLOCK = 512
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


class BlobWriter:
    """Writes gzip members to a file and tracks the compressed and tar offsets."""

    def __init__(self, path, level):
        self.file = open(path, "wb")
        self.level = level
        self.offset = 0
        self.blob_sha = hashlib.sha256()
        self.tar_sha = hashlib.sha256()
        self.tar_size = 0
        self.member = None

    def _emit(self, data):
        self.file.write(data)
        self.blob_sha.update(data)
        self.offset += len(data)

    def start_member(self):
        """Close the open member, open a new one, and return its blob offset."""
        self.end_member()
        start = self.offset
        self._emit(GZIP_HEADER)
        self.member = [zlib.compressobj(self.level, zlib.DEFLATED, -15), 0, 0]
        return start

    def write(self, data):
        """Append uncompressed tar bytes to the open member."""
        if self.member is None:
            self.start_member()
        compressor, crc, size = self.member
        self._emit(compressor.compress(data))
        self.member[1] = zlib.crc32(data, crc)
        self.member[2] = size + len(data)
        self.tar_sha.update(data)
        self.tar_size += len(data)

    def end_member(self):
        if self.member is None:
            return
        compressor, crc, size = self.member
        self._emit(compressor.flush())
        self._emit(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
        self.member = None

    def write_footer(self, toc_offset):
        self.end_member()
        payload = b"%016xSTARGZ" % toc_offset
        extra = b"SG" + struct.pack("<H", len(payload)) + payload
        header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra))
        # An empty final stored deflate block, then CRC32 and ISIZE of nothing.
        footer = header + extra + b"\x01\x00\x00\xff\xff" + b"\x00" * 8
        assert len(footer) == 51
        self._emit(footer)

    def close(self):
        self.file.close()


def tar_header(name, kind, size=0, mode=0o644, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = MTIME
    info.linkname = link
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def padding(size):
    return b"\x00" * (-size % TAR_BLOCK)


def file_content(layer, index):
    length = (index * 7919 + layer * 131) % 512
    if index % 50 == 0:
        length = 0
    line = b"layer %d file %d\n" % (layer, index)
    return (line * (length // len(line) + 1))[:length]


def layer_entries(layer, first, count):
    """Yield (name, type, payload) for COUNT entries numbered from FIRST."""
    current_dir = None
    for index in range(first, first + count):
        directory = "d%05d" % (index // ENTRIES_PER_DIR)
        if directory != current_dir:
            current_dir = directory
            yield directory + "/", "dir", None
            continue
        name = "%s/l%02d_%07d" % (directory, layer, index)
        if index % 10 == 3:
            yield name + ".lnk", "symlink", "l%02d_%07d" % (layer, index - 1)
        else:
            yield name, "reg", file_content(layer, index)


def write_layer(path, layer, first, count, level):
    """Write one eStargz blob; return its digest, size, TOC digest, diff ID, tar size."""
    blob = BlobWriter(path, level)
    toc_file = tempfile.TemporaryFile()
    toc_sha = hashlib.sha256()

    def toc_append(entry, comma=True):
        data = (("," if comma else "") + json.dumps(entry, separators=(",", ":"))).encode()
        toc_file.write(data)
        toc_sha.update(data)

    head = b'{"version":1,"entries":['
    toc_file.write(head)
    toc_sha.update(head)

    entries = [(".no.prefetch.landmark", "reg", b"\x0f")]
    entries_iter = layer_entries(layer, first, count)
    first_entry = True
    for name, kind, payload in _chain(entries, entries_iter):
        if kind == "dir":
            blob.write(tar_header(name, tarfile.DIRTYPE, mode=0o755))
            toc = {"name": name, "type": "dir", "modtime": MODTIME, "mode": 0o755}
        elif kind == "symlink":
            blob.write(tar_header(name, tarfile.SYMTYPE, mode=0o777, link=payload))
            toc = {"name": name, "type": "symlink", "modtime": MODTIME,
                   "linkName": payload, "mode": 0o777}
        else:
            blob.write(tar_header(name, tarfile.REGTYPE, size=len(payload)))
            digest = "sha256:" + hashlib.sha256(payload).hexdigest()
            toc = {"name": name, "type": "reg", "modtime": MODTIME, "mode": 0o644,
                   "digest": digest}
            if payload:
                toc["size"] = len(payload)
                toc["offset"] = blob.start_member()
                toc["chunkDigest"] = digest
                blob.write(payload + padding(len(payload)))
        toc_append(toc, comma=not first_entry)
        first_entry = False

    tail = b"]}"
    toc_file.write(tail)
    toc_sha.update(tail)
    toc_size = toc_file.tell()

    toc_offset = blob.start_member()
    blob.write(tar_header("stargz.index.json", tarfile.REGTYPE, size=toc_size))
    toc_file.seek(0)
    while True:
        data = toc_file.read(1 << 20)
        if not data:
            break
        blob.write(data)
    blob.write(padding(toc_size) + b"\x00" * (2 * TAR_BLOCK))
    blob.write_footer(toc_offset)
    blob.close()
    toc_file.close()
    return {
        "digest": "sha256:" + blob.blob_sha.hexdigest(),
        "size": blob.offset,
        "toc_digest": "sha256:" + toc_sha.hexdigest(),
        "diff_id": "sha256:" + blob.tar_sha.hexdigest(),
        "uncompressed_size": blob.tar_size,
    }


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable


def write_blob_json(blobs, obj):
    data = json.dumps(obj, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, required=True, help="total TOC entries")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--out", required=True, help="OCI layout directory to create")
    parser.add_argument("--level", type=int, default=1, help="gzip level")
    args = parser.parse_args()

    blobs = os.path.join(args.out, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    per_layer = args.entries // args.layers
    layers = []
    for layer in range(args.layers):
        tmp = os.path.join(blobs, ".layer%d.tmp" % layer)
        info = write_layer(tmp, layer, 0, per_layer, args.level)
        os.rename(tmp, os.path.join(blobs, info["digest"].split(":")[1]))
        layers.append(info)

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [x["diff_id"] for x in layers]},
    }
    config_digest, config_size = write_blob_json(blobs, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": x["digest"],
                "size": x["size"],
                "annotations": {
                    "containerd.io/snapshot/stargz/toc.digest": x["toc_digest"],
                    "io.containers.estargz.uncompressed-size": str(x["uncompressed_size"]),
                },
            }
            for x in layers
        ],
    }
    manifest_digest, manifest_size = write_blob_json(blobs, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    }
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(args.out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    summary = {"entries": args.entries, "layers": args.layers,
               "blob_bytes": sum(x["size"] for x in layers),
               "uncompressed_bytes": sum(x["uncompressed_size"] for x in layers)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
