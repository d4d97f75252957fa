#!/usr/bin/env python3
"""Writes a container image archive that both `ctr images import` and
`docker load` accept, from directory trees (one per layer), as `docker save`
has written them since Docker 25: an OCI image layout (`oci-layout`,
`index.json`, `blobs/sha256/...`) plus a docker `manifest.json` whose Config
and Layers name the same blobs.

Stdlib only and deterministic: layer entries sorted, owned by 0:0, every
mtime in a layer set to that layer's MTIME, gzip without name or timestamp.
The same trees and arguments give the same bytes, hence the same image
digest. (umoci and skopeo can each write one of the two formats but not one
archive holding both, and would need their own timestamp handling; this
writer is under 200 lines and needs nothing but Python.)

usage: oci-archive.py --name stowage.dev/stowage --tag 0.1.0 --created EPOCH
         --layer MTIME:DIR:COMMENT [--layer ...] [--entrypoint PATH] [--env K=V]
         [--label K=V] [--user USER] OUT.tar
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import time

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def layer_tar(root, mtime):
    """The uncompressed layer: every entry under root, sorted, parents first."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in dirnames + filenames:
                paths.append(os.path.join(dirpath, name))
        for path in sorted(paths, key=lambda p: os.path.relpath(p, root).split(os.sep)):
            arcname = os.path.relpath(path, root)
            info = tar.gettarinfo(path, arcname)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = mtime
            info.mode = stat.S_IMODE(os.lstat(path).st_mode)
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def gzipped(data):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True, help="repository, e.g. stowage.dev/stowage")
    p.add_argument("--tag", required=True)
    p.add_argument("--created", type=int, required=True, help="seconds since the epoch")
    p.add_argument("--layer", action="append", required=True, help="MTIME:DIR:COMMENT")
    p.add_argument("--entrypoint")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--label", action="append", default=[])
    p.add_argument("--user", default="0")
    p.add_argument("out")
    args = p.parse_args()

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(args.created))
    blobs = {}  # digest -> bytes
    layers, diff_ids, history = [], [], []
    for spec in args.layer:
        mtime, root, comment = spec.split(":", 2)
        raw = layer_tar(root, int(mtime))
        compressed = gzipped(raw)
        d = digest(compressed)
        blobs[d] = compressed
        layers.append({"mediaType": OCI_LAYER_GZIP, "digest": d, "size": len(compressed)})
        diff_ids.append(digest(raw))
        history.append({"created": created, "created_by": "scripts/build-image.sh", "comment": comment})

    labels = dict(label.split("=", 1) for label in args.label)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {"User": args.user, "Env": args.env, "WorkingDir": "/", "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    if args.entrypoint:
        config["config"]["Entrypoint"] = [args.entrypoint]
    config_bytes = canonical(config)
    config_digest = digest(config_bytes)
    blobs[config_digest] = config_bytes

    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": layers,
        "annotations": {"org.opencontainers.image.created": created},
    }
    manifest_bytes = canonical(manifest)
    manifest_digest = digest(manifest_bytes)
    blobs[manifest_digest] = manifest_bytes

    reference = f"{args.name}:{args.tag}"
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "annotations": {
                    "io.containerd.image.name": reference,
                    "org.opencontainers.image.ref.name": args.tag,
                },
            }
        ],
    }
    blob_path = lambda d: "blobs/sha256/" + d.split(":", 1)[1]
    docker_manifest = [
        {
            "Config": blob_path(config_digest),
            "RepoTags": [reference],
            "Layers": [blob_path(layer["digest"]) for layer in layers],
        }
    ]

    entries = [("blobs/", None), ("blobs/sha256/", None)]
    entries += [(blob_path(d), data) for d, data in sorted(blobs.items())]
    entries += [
        ("index.json", canonical(index)),
        ("manifest.json", canonical(docker_manifest)),
        ("oci-layout", canonical({"imageLayoutVersion": "1.0.0"})),
    ]
    tmp = args.out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = args.created
            info.uname = info.gname = "root"
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, args.out)
    print(manifest_digest)


if __name__ == "__main__":
    main()
