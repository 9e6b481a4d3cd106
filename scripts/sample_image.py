#!/usr/bin/env python3
"""Write the sample eStargz image in examples/ from a fixed file tree.

Usage: sample_image.py ESTARGZ_REF OUT_DIR SIDECAR

The input tar is built here with tarfile (PAX format, fixed mtimes and owners),
so it is the same on every run. ESTARGZ_REF, the checker built from the
reference eStargz library, turns it into the layer blob. This script then
writes the OCI image layout around that blob and the sidecar JSON that
describes the expected filesystem (`merged_tree`).
"""

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

MTIME = 1700000000  # 2023-11-14T22:13:20Z
CREATED = "2023-11-14T22:13:20Z"
CHUNK_SIZE = 256 * 1024
LEVEL = 9
PROCS = 2
PRIORITIZED = ["bin/hello.sh", "etc/os-release"]

OS_RELEASE = b"""PRETTY_NAME="esgz-nbd sample image"
NAME="esgz-nbd sample"
ID=esgz-sample
VERSION_ID=1
"""

README = b"""esgz-nbd sample image
=====================

This image is a small eStargz example. Its only layer was written by the
reference eStargz library, and scripts/make-sample-image.sh rebuilds it.

  /bin/hello.sh           a shell script (mode 0755)
  /bin/hello              a symlink to hello.sh
  /etc/os-release         carries the xattr user.comment
  /usr/share/doc/sample/  a few small text files
  /usr/share/doc/sample/README.txt
                          a hard link to this file
  /var/lib/sample/big.txt 1 MiB of numbered text lines (4 chunks of 256 KiB)
  /home/user/             owned by uid and gid 1000
"""

HELLO = b"""#!/bin/sh
# Print a greeting and the image's name from /etc/os-release.
. /etc/os-release
echo "Hello from $PRETTY_NAME"
"""


def big_text():
    """Return exactly 1 MiB of numbered, distinct text lines."""
    out = bytearray()
    line = 0
    while len(out) < 1024 * 1024:
        out += b"line %06d: the quick brown fox jumps over the lazy dog\n" % line
        line += 1
    return bytes(out[: 1024 * 1024])


def d(path, mode=0o755, uid=0, gid=0):
    return {"path": path, "type": "dir", "mode": mode, "uid": uid, "gid": gid}


def f(path, data, mode=0o644, uid=0, gid=0, xattrs=None):
    return {"path": path, "type": "reg", "mode": mode, "uid": uid, "gid": gid,
            "data": data, "xattrs": xattrs or {}}


def tree():
    """Return the tar entries in tar order. Paths are relative, without "./"."""
    return [
        d("bin"),
        f("bin/hello.sh", HELLO, mode=0o755),
        {"path": "bin/hello", "type": "symlink", "mode": 0o777, "uid": 0, "gid": 0,
         "link": "hello.sh"},
        d("etc"),
        f("etc/os-release", OS_RELEASE,
          xattrs={"user.comment": b"sample image for esgz-nbd"}),
        f("etc/hostname", b"esgz-sample\n"),
        d("home"),
        d("home/user", mode=0o750, uid=1000, gid=1000),
        f("home/user/.profile", b"PATH=/bin:/usr/bin\nexport PATH\n", uid=1000, gid=1000),
        f("home/user/notes.txt", b"private notes\n", mode=0o600, uid=1000, gid=1000),
        f("README.txt", README),
        d("usr"),
        d("usr/share"),
        d("usr/share/doc"),
        d("usr/share/doc/sample"),
        f("usr/share/doc/sample/changelog", b"1 (2023-11-14): first sample image\n"),
        f("usr/share/doc/sample/copyright", b"The sample files are in the public domain.\n"),
        f("usr/share/doc/sample/empty", b""),
        {"path": "usr/share/doc/sample/README.txt", "type": "hardlink", "target": "README.txt"},
        d("var"),
        d("var/lib"),
        d("var/lib/sample"),
        f("var/lib/sample/big.txt", big_text()),
    ]


NAMES = {0: "root", 1000: "user"}
GROUPS = {0: "root", 1000: "users"}


def write_tar(entries, path):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e["path"])
            info.mtime = MTIME
            if e["type"] == "hardlink":
                target = next(t for t in entries if t["path"] == e["target"])
                info.type = tarfile.LNKTYPE
                info.linkname = e["target"]
                info.mode = target["mode"]
                info.uid, info.gid = target["uid"], target["gid"]
            else:
                info.mode = e["mode"]
                info.uid, info.gid = e["uid"], e["gid"]
            info.uname, info.gname = NAMES[info.uid], GROUPS[info.gid]
            data = None
            if e["type"] == "dir":
                info.type = tarfile.DIRTYPE
            elif e["type"] == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = e["link"]
            elif e["type"] == "reg":
                info.size = len(e["data"])
                data = io.BytesIO(e["data"])
                for name, value in e["xattrs"].items():
                    info.pax_headers["SCHILY.xattr." + name] = value.decode("utf-8")
            tar.addfile(info, data)


def sha256_hex(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sidecar_entry(e, entries):
    """Describe one tar entry in the fixture sidecar format."""
    if e["type"] == "hardlink":
        target = next(t for t in entries if t["path"] == e["target"])
        meta = target
    else:
        meta = e
    out = {
        "path": "/" + e["path"],
        "tar_name": e["path"] + ("/" if e["type"] == "dir" else ""),
        "type": e["type"],
        "mode": meta["mode"],
        "mode_octal": "%04o" % meta["mode"],
        "uid": meta["uid"],
        "gid": meta["gid"],
        "uname": NAMES[meta["uid"]],
        "gname": GROUPS[meta["gid"]],
        "mtime": MTIME,
    }
    if meta["type"] == "reg":
        out["size"] = len(meta["data"])
        out["sha256"] = sha256_hex(meta["data"])
    if e["type"] == "reg":
        names = 1 + sum(1 for t in entries if t.get("target") == e["path"])
        out["nlink"] = names
    if e["type"] == "symlink":
        out["link_target"] = e["link"]
    if e["type"] == "hardlink":
        out["link_target"] = "/" + e["target"]
        out["tar_linkname"] = e["target"]
    xattrs = meta.get("xattrs", {}) if e["type"] != "symlink" else {}
    out["xattrs_b64"] = {k: base64.b64encode(v).decode() for k, v in sorted(xattrs.items())}
    return out


def merged_tree(layer_entries):
    """Return the filesystem after applying the single layer to an empty rootfs."""
    merged = [{"path": "/", "type": "dir", "implicit": True, "from_layer": 1}]
    for e in layer_entries:
        m = {k: v for k, v in e.items() if k not in ("tar_name", "nlink", "tar_linkname")}
        if e["type"] == "hardlink":
            m["type"] = "reg"
            m["hardlink_target"] = m.pop("link_target")
        m["from_layer"] = 1
        merged.append(m)
    merged.sort(key=lambda m: m["path"].encode())
    return merged


def write_json_blob(blobs, obj):
    data = json.dumps(obj, indent=2).encode() + b"\n"
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as out:
        out.write(data)
    return "sha256:" + digest, len(data)


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: sample_image.py ESTARGZ_REF OUT_DIR SIDECAR")
    estargz_ref, out_dir, sidecar = sys.argv[1:]
    entries = tree()

    with tempfile.TemporaryDirectory() as tmp:
        tar_path = os.path.join(tmp, "input.tar")
        write_tar(entries, tar_path)
        with open(tar_path, "rb") as tar_file:
            tar_bytes = tar_file.read()
        blob_path = os.path.join(tmp, "layer.esgz")
        result_path = os.path.join(tmp, "build.json")
        command = [estargz_ref, "build", "-in", tar_path, "-out", blob_path,
                   "-chunk-size", str(CHUNK_SIZE), "-level", str(LEVEL),
                   "-procs", str(PROCS), "-json", result_path]
        for p in PRIORITIZED:
            command += ["-p", p]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        with open(result_path) as result_file:
            build = json.load(result_file)

        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        blobs = os.path.join(out_dir, "blobs", "sha256")
        os.makedirs(blobs)
        with open(blob_path, "rb") as blob_file:
            blob = blob_file.read()
    blob_digest = sha256_hex(blob)
    if blob_digest != build["blob_digest"]:
        sys.exit("blob digest %s differs from the builder's %s" % (blob_digest, build["blob_digest"]))
    with open(os.path.join(blobs, blob_digest.split(":")[1]), "wb") as out:
        out.write(blob)

    config = {
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/hello.sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": [build["diff_id"]]},
        "history": [{"created": CREATED, "created_by": "scripts/make-sample-image.sh"}],
    }
    config_digest, config_size = write_json_blob(blobs, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": blob_digest,
            "size": len(blob),
            "annotations": {
                "containerd.io/snapshot/stargz/toc.digest": build["toc_digest"],
                "io.containers.estargz.uncompressed-size": str(build["uncompressed_size"]),
            },
        }],
        "annotations": {"org.opencontainers.image.title": "esgz-nbd-sample"},
    }
    manifest_digest, manifest_size = write_json_blob(blobs, manifest)
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
    with open(os.path.join(out_dir, "index.json"), "w") as out:
        json.dump(index, out, indent=2)
        out.write("\n")
    with open(os.path.join(out_dir, "oci-layout"), "w") as out:
        out.write('{"imageLayoutVersion": "1.0.0"}\n')

    layer_entries = [sidecar_entry(e, entries) for e in entries]
    landmark = ".prefetch.landmark" if PRIORITIZED else ".no.prefetch.landmark"
    document = {
        "fixture": "sample",
        "description": "the esgz-nbd sample image: os-release with an xattr, a script, "
                       "a symlink, a hard link, a 1 MiB text file in 4 chunks, a user's home",
        "generator": {
            "module": "github.com/containerd/stargz-snapshotter/estargz",
            "tool": "scripts/make-sample-image.sh (estargz-ref build)",
        },
        "layers": [{
            "input_tar": None,
            "input_tar_note": "not stored; scripts/make-sample-image.sh regenerates it",
            "input_tar_sha256": sha256_hex(tar_bytes),
            "input_tar_size": len(tar_bytes),
            "toc_digest": build["toc_digest"],
            "diff_id": build["diff_id"],
            "blob_digest": blob_digest,
            "blob_size": len(blob),
            "uncompressed_size": build["uncompressed_size"],
            "build": {
                "chunk_size": CHUNK_SIZE,
                "compression_level": LEVEL,
                "prioritized_files": PRIORITIZED,
                "gomaxprocs": PROCS,
            },
            "builder_added_tar_entries": [landmark, "stargz.index.json"],
            "entries": layer_entries,
        }],
        "merged_tree": merged_tree(layer_entries),
        "plain_extraction_extra_paths": ["/" + landmark, "/stargz.index.json"],
        "oci_layout": {
            "path": os.path.basename(out_dir.rstrip("/")),
            "ref": "latest",
            "manifest_digest": manifest_digest,
            "manifest_size": manifest_size,
            "config_digest": config_digest,
            "config_size": config_size,
        },
    }
    with open(sidecar, "w") as out:
        json.dump(document, out, indent=1)
        out.write("\n")


if __name__ == "__main__":
    main()
