#!/usr/bin/env python3
"""Builds the two container images the test node runs, from Debian's
busybox-static, as docker-archive tarballs for `ctr images import`:
stowage.dev/pause:1 (the pod sandbox) and stowage.dev/busybox:1.
No registry is reachable, so nothing is ever pulled.

usage: pod-images.py OUT_DIR
"""
import hashlib, io, json, tarfile, sys, os
def build(name, entrypoint, out):
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode='w') as t:
        for d in ['bin','tmp','etc','proc','sys','dev','data']:
            ti=tarfile.TarInfo(d); ti.type=tarfile.DIRTYPE; ti.mode=0o755 if d!='tmp' else 0o1777; t.addfile(ti)
        t.add('/usr/bin/busybox', arcname='bin/busybox')
        for applet in ['sh','sleep','cat','echo','ls','dd','sync','true','test','mount','df','stat','head','od','wc','grep']:
            ti=tarfile.TarInfo('bin/'+applet); ti.type=tarfile.SYMTYPE; ti.linkname='busybox'; t.addfile(ti)
    data=layer.getvalue()
    diff='sha256:'+hashlib.sha256(data).hexdigest()
    config=json.dumps({"architecture":"amd64","os":"linux","config":{"Entrypoint":entrypoint,"Env":["PATH=/bin"]},"rootfs":{"type":"layers","diff_ids":[diff]}}).encode()
    with tarfile.open(out,'w') as t:
        def add(n,b):
            ti=tarfile.TarInfo(n); ti.size=len(b); t.addfile(ti,io.BytesIO(b))
        add('layer.tar',data); add('config.json',config)
        add('manifest.json',json.dumps([{"Config":"config.json","RepoTags":[name],"Layers":["layer.tar"]}]).encode())
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
# The sandbox only has to stay alive and exit on TERM.
build('stowage.dev/pause:1', ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while true; do sleep 3600 & wait $!; done"], os.path.join(out, 'pause.tar'))
build('stowage.dev/busybox:1', ["/bin/sh"], os.path.join(out, 'busybox.tar'))
