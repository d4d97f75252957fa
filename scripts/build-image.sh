#!/usr/bin/env bash
# Builds the stowage container image, one for both roles, without a container
# engine or a registry: target/image/stowage-TAG.tar, loadable with
# `ctr images import` and `docker load`. TAG defaults to the crate version.
#
#   scripts/build-image.sh [TAG]
#
# Layer 1: the host tools the node agent runs (mount, umount, losetup, blkid,
# mkfs.ext4, e2fsck, resize2fs, mkfs.xfs, xfs_growfs) and exactly the shared
# libraries they and stowage link, taken from Debian's packages, with those
# packages' copyright files and /usr/share/stowage/packages.txt naming every
# package a file came from, at its exact version. Layer 2: the stowage
# release binary. The Debian packages are unpacked once by mmdebstrap and
# cached in $STOWAGE_CACHE/image/ under a key of the suite and package list;
# delete that directory to pick up newer package versions.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

IMAGE_NAME=stowage.dev/stowage
DEBIAN_SUITE=bookworm
DEBIAN_SOURCES=(
  "deb http://deb.debian.org/debian $DEBIAN_SUITE main"
  "deb http://deb.debian.org/debian $DEBIAN_SUITE-updates main"
  "deb http://deb.debian.org/debian-security $DEBIAN_SUITE-security main"
)
# The packages the tools come from (their dependencies are resolved by apt).
DEBIAN_PACKAGES=(libc6 libgcc-s1 mount util-linux e2fsprogs xfsprogs)
# Every program stowage runs (grep -rn 'Command::new' src).
TOOLS=(mount umount losetup blkid blockdev mkfs.ext4 e2fsck resize2fs dumpe2fs mkfs.xfs xfs_growfs)
# Data files the tools read: mke2fs's defaults per filesystem type.
TOOL_FILES=(etc/mke2fs.conf)
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

cd "$REPO_ROOT"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[[ -n $version ]] || die "no version in Cargo.toml"
tag=${1:-$version}
[[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "invalid image tag: $tag"
revision=$(git rev-parse HEAD)
# Where the source lives: STOWAGE_IMAGE_SOURCE, else the origin remote.
source_url=${STOWAGE_IMAGE_SOURCE:-$(git config --get remote.origin.url || echo https://stowage.dev)}
# Timestamps of the image and its stowage layer: the commit's (not exported:
# ring's build script would rebuild when it changes).
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct HEAD)}
for cmd in mmdebstrap dpkg-deb readelf python3; do
  command -v "$cmd" >/dev/null || die "$cmd missing: run scripts/install-deps.sh"
done

work=$(mktemp -d)
tmp=
trap 'rm -rf "$work" ${tmp:+"$tmp"}' EXIT

log "building the release binary"
cargo build --release --locked --bin stowage
binary=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/stowage

# The unpacked packages, once per suite and package list.
key=$(printf '%s\n' "format 1" "${DEBIAN_SOURCES[@]}" "${DEBIAN_PACKAGES[@]}" | sha256sum | cut -c1-16)
debian=$STOWAGE_CACHE/image/debian-$DEBIAN_SUITE-$key
if [[ ! -f $debian/packages.tsv ]]; then
  log "unpacking ${DEBIAN_PACKAGES[*]} from Debian $DEBIAN_SUITE into $debian"
  tmp=$debian.tmp.$$
  rm -rf "$tmp"
  mkdir -p "$tmp"
  # extract: unpack the packages and their dependencies, run no maintainer
  # scripts; keep the .debs to learn which package owns which file.
  SOURCE_DATE_EPOCH=$epoch mmdebstrap --quiet --variant=extract --include="$(IFS=,; echo "${DEBIAN_PACKAGES[*]}")" \
    --skip=cleanup/apt/cache "$DEBIAN_SUITE" "$tmp/root" "${DEBIAN_SOURCES[@]}"
  for deb in "$tmp"/root/var/cache/apt/archives/*.deb; do
    read -r package pkgversion arch < <(dpkg-deb --show --showformat '${Package} ${Version} ${Architecture}\n' "$deb")
    printf '%s\t%s\t%s\n' "$package" "$pkgversion" "$arch" >> "$tmp/packages.tsv"
    # ./usr/sbin/x -> usr/sbin/x, owned by package.
    dpkg-deb --fsys-tarfile "$deb" | tar -t | sed -n "s|^\./\(.*[^/]\)$|\1\t$package|p" >> "$tmp/files.tsv"
  done
  rm -rf "$tmp"/root/var/cache/apt "$tmp"/root/var/lib/apt
  sort -o "$tmp/packages.tsv" "$tmp/packages.tsv"
  rm -rf "$debian"
  mv "$tmp" "$debian"
  tmp=
fi
root=$debian/root

base=$work/base
app=$work/app
mkdir -p "$base" "$app/usr/local/bin"

# put PATH: copies PATH (relative to the Debian root) into the base layer;
# for a symlink also what it points to.
put() {
  local path=$1
  [[ -e $base/$path || -L $base/$path ]] && return 0
  [[ -e $root/$path || -L $root/$path ]] || die "$path is not in the Debian packages"
  mkdir -p "$base/$(dirname "$path")"
  cp -P --preserve=mode,timestamps "$root/$path" "$base/$path"
  if [[ -L $root/$path ]]; then
    local target
    target=$(readlink "$root/$path")
    [[ $target == /* ]] && target=${target#/} || target=$(dirname "$path")/$target
    put "$(realpath -m -s --relative-to=/ "/$target")"
  fi
}

# libs ELF: prints the path, in the Debian root, of every library ELF needs, directly
# or through another library, and of its program interpreter.
lib_dirs=(lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib64 lib usr/lib)
libs() {
  local -A seen=()
  local queue=("$1") file interp needed dir found
  while ((${#queue[@]})); do
    file=${queue[0]}
    queue=("${queue[@]:1}")
    interp=$(readelf -l "$file" | sed -n 's/.*Requesting program interpreter: \(.*\)]$/\1/p')
    if [[ -n $interp && -z ${seen[$interp]:-} ]]; then
      seen[$interp]=1
      echo "${interp#/}"
    fi
    for needed in $(readelf -d "$file" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'); do
      [[ -n ${seen[$needed]:-} ]] && continue
      seen[$needed]=1
      found=
      for dir in "${lib_dirs[@]}"; do
        if [[ -e $root/$dir/$needed ]]; then found=$dir/$needed; break; fi
      done
      [[ -n $found ]] || die "$file needs $needed, which no unpacked package has"
      echo "$found"
      queue+=("$root/$found")
    done
  done
}

log "assembling the image"
for tool in "${TOOLS[@]}"; do
  found=
  for dir in sbin bin usr/sbin usr/bin; do
    if [[ -e $root/$dir/$tool ]]; then found=$dir/$tool; break; fi
  done
  [[ -n $found ]] || die "no package provides $tool"
  put "$found"
  libs "$root/$found" >> "$work/libs"
done
libs "$binary" >> "$work/libs"
for file in "${TOOL_FILES[@]}" $(sort -u "$work/libs"); do put "$file"; done

# The tools' layer changes only with the packages: its timestamps are those
# of its newest file, not the commit's.
base_epoch=$(find "$base" -type f -printf '%T@\n' | sort -n | tail -1 | cut -d. -f1)

# Which packages the files came from, with the exact versions, and their
# copyright notices.
(cd "$base" && find . ! -type d | sed 's|^\./||') | sort > "$work/files"
awk -F'\t' 'NR == FNR { want[$1] = 1; next } ($1 in want) { print $2 }' \
  "$work/files" "$debian/files.tsv" | sort -u > "$work/owners"
[[ $(wc -l < "$work/owners") -gt 0 ]] || die "no package owns the image's files"
mkdir -p "$base/usr/share/stowage"
{
  echo "# Debian $DEBIAN_SUITE packages the files of this image come from: package version architecture"
  awk -F'\t' 'NR == FNR { want[$1] = 1; next } ($1 in want) { print $1, $2, $3 }' \
    "$work/owners" "$debian/packages.tsv"
} > "$base/usr/share/stowage/packages.txt"
while read -r package; do
  mkdir -p "$base/usr/share/doc/$package"
  cp -L "$root/usr/share/doc/$package/copyright" "$base/usr/share/doc/$package/copyright"
done < "$work/owners"

# The rest of a root filesystem: users for the two roles (the node agent runs
# as root, the controller as 65532), mount points and /etc/mtab.
mkdir -p "$base/etc" "$base/root" "$base/tmp" "$base/proc" "$base/sys" "$base/dev" "$base/run" "$base/var/tmp"
chmod 1777 "$base/tmp" "$base/var/tmp"
chmod 700 "$base/root"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' > "$base/etc/passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' > "$base/etc/group"
# e2fsprogs and util-linux look for mounts here, as on a Debian system.
ln -s ../proc/self/mounts "$base/etc/mtab"

# Debug info is dropped; the symbols stay, for backtraces.
strip --strip-debug -o "$app/usr/local/bin/stowage" "$binary"
chmod 755 "$app/usr/local/bin/stowage"

out_dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/image
mkdir -p "$out_dir"
out=$out_dir/stowage-$tag.tar
digest=$(python3 "$REPO_ROOT/scripts/oci-archive.py" \
  --name "$IMAGE_NAME" --tag "$tag" --created "$epoch" \
  --layer "$base_epoch:$base:Debian $DEBIAN_SUITE: ${TOOLS[*]}" \
  --layer "$epoch:$app:stowage $tag" \
  --entrypoint /usr/local/bin/stowage --user 0 \
  --env "PATH=$IMAGE_PATH" \
  --label "org.opencontainers.image.title=stowage" \
  --label "org.opencontainers.image.description=$(sed -n 's/^description = "\(.*\)"$/\1/p' Cargo.toml | head -1)" \
  --label "org.opencontainers.image.version=$tag" \
  --label "org.opencontainers.image.revision=$revision" \
  --label "org.opencontainers.image.source=$source_url" \
  --label "org.opencontainers.image.licenses=Apache-2.0" \
  "$out")
cp "$base/usr/share/stowage/packages.txt" "$out_dir/stowage-$tag.packages.txt"
log "$IMAGE_NAME:$tag ($digest): $out, $(du -m "$out" | cut -f1) MB"
echo "$out"
