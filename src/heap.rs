//! Heap policy of the process (glibc `mallopt(3)`) and handing freed heap
//! memory back to the kernel between the phases of opening an image
//! (glibc `malloc_trim(3)`).
//!
//! Parsing a large TOC and merging its entries allocate and free millions
//! of small blocks. glibc keeps the freed pages in the process, so without
//! a trim they stay resident next to the tree, layout and store built
//! afterwards, and count towards the server's peak memory.

/// Allocations of at least this many bytes get their own memory mapping.
const MMAP_THRESHOLD: i32 = 1 << 20;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`]. Call it once, before
/// the process allocates much. A no-op where the C library is not glibc.
///
/// glibc raises the threshold to the size of each mapped block that is freed
/// (up to 32 MiB). Opening an image of many layers frees each layer's
/// compressed TOC of a few MiB, so without a fixed threshold the chunk tables
/// and other large vectors built afterwards land on the main heap, among small
/// blocks that stay live. A free page there goes back to the kernel only when
/// no live block sits on it. Measured with `esgz-nbd serve` on the 1M-entry
/// images of scripts/bench/attach.sh (2 CPUs): the 20-layer peak varied from
/// 343 to 389 MiB over four runs with the dynamic threshold, and it was
/// 329 and 330 MiB in two runs with a fixed 1 MiB.
pub fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes a parameter of the allocator and takes
        // no pointers.
        let changed = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        if changed != 1 {
            tracing::debug!(
                threshold = MMAP_THRESHOLD,
                "glibc rejected the mmap threshold, so large blocks follow its dynamic threshold"
            );
        }
    }
}

/// Returns the free pages of the heap to the kernel; a no-op where the C
/// library is not glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists and
        // takes no pointers from the caller; with a pad of 0 it keeps no
        // extra space at the top of the heap.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::trace!(
            released = released != 0,
            "returned free heap pages to the kernel"
        );
    }
}
