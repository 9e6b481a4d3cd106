# Shared parts of the VM test scripts: finding the shared fixtures, the
# Debian kernel (linux-image-amd64, downloaded with apt-get and cached), its
# module dependencies and a busybox initramfs.
#
# Source it from bash after defining `log MESSAGE` and `die MESSAGE`. The
# functions set these globals: vmlinuz, kver, moddir (vm_fetch_kernel),
# module_path and module_order (vm_resolve_modules).

declare -A module_path=()
declare -a module_order=()
declare -A module_seen=()

# vm_require_tools TOOL...: dies naming the first tool that is not on PATH.
vm_require_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool is missing (scripts/install-deps.sh installs the test tools)"
    done
}

# vm_find_shared ROOT: prints the directory with fixtures/ and images/.
vm_find_shared() {
    local candidate
    for candidate in "${ESGZ_SHARED:-}" "$1/../shared" /work/shared; do
        if [[ -n "$candidate" && -d "$candidate/fixtures" ]]; then
            (cd "$candidate" && pwd)
            return
        fi
    done
    die "no shared fixture directory found (set ESGZ_SHARED)"
}

# vm_fetch_kernel WORK: unpacks the kernel package behind linux-image-amd64
# into WORK/kernel once. A lock on WORK/kernel.lock keeps two scripts that
# run at the same time from unpacking into the same directory.
vm_fetch_kernel() {
    local work=$1 kernel_dir="$1/kernel" package
    mkdir -p "$work"
    exec {kernel_lock}> "$work/kernel.lock"
    flock "$kernel_lock"
    if [[ ! -e "$kernel_dir/.unpacked" ]]; then
        package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
        [[ -n "$package" ]] || die "cannot resolve the kernel package behind linux-image-amd64 (run apt-get update)"
        log "downloading $package"
        rm -rf "$kernel_dir" "$work/deb"
        mkdir -p "$work/deb" "$kernel_dir"
        (cd "$work/deb" && apt-get download "$package" >&2)
        dpkg-deb -x "$work"/deb/*.deb "$kernel_dir"
        touch "$kernel_dir/.unpacked"
    fi
    flock -u "$kernel_lock"
    exec {kernel_lock}>&-
    vmlinuz=$(ls "$kernel_dir"/boot/vmlinuz-* | head -n1)
    kver=${vmlinuz##*/vmlinuz-}
    moddir="$kernel_dir/lib/modules/$kver"
    log "kernel $kver"
}

# vm_resolve_modules MODULE...: appends each module and its dependencies to
# module_order, dependencies first. Dependencies come from each module's own
# `depends=` modinfo field, because the package ships no modules.dep (depmod
# runs at install time). Modules built into the kernel are left out.
vm_resolve_modules() {
    local path name module
    if [[ ${#module_path[@]} -eq 0 ]]; then
        while IFS= read -r path; do
            name=${path##*/}
            name=${name%.ko}
            module_path[${name//-/_}]=$path
        done < <(find "$moddir/kernel" -name '*.ko')
    fi
    for module in "$@"; do
        vm_add_module "$module"
    done
    log "modules: ${module_order[*]}"
}

vm_add_module() {
    local name=${1//-/_} deps dep
    [[ -n "${module_seen[$name]:-}" ]] && return
    module_seen[$name]=1
    local path=${module_path[$name]:-}
    if [[ -z "$path" ]]; then
        grep -q "/$name.ko" "$moddir/modules.builtin" 2>/dev/null && return
        die "kernel module $name not found"
    fi
    deps=$(grep -a -o 'depends=[^[:cntrl:]]*' "$path" | head -n1 | cut -d= -f2)
    for dep in ${deps//,/ }; do
        vm_add_module "$dep"
    done
    module_order+=("$name")
}

# vm_initramfs_base DIR: a fresh initramfs tree with busybox, the usual
# mount points and the modules of module_order, listed in load order in
# DIR/modules/order. The caller adds DIR/init.
vm_initramfs_base() {
    local dir=$1 name
    rm -rf "$dir"
    mkdir -p "$dir"/{bin,sbin,dev,proc,sys,run,tmp,mnt,data,modules,etc}
    cp "$(command -v busybox)" "$dir/bin/busybox"
    : > "$dir/modules/order"
    for name in "${module_order[@]}"; do
        cp "${module_path[$name]}" "$dir/modules/$name.ko"
        echo "$name" >> "$dir/modules/order"
    done
}

# vm_pack_initramfs DIR OUTPUT: writes DIR as a gzip-compressed newc cpio.
vm_pack_initramfs() {
    (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) > "$2"
}
