//! Handing freed heap memory back to the kernel between the phases of
//! opening an image (glibc `malloc_trim(3)`).
//!
//! Parsing a large TOC and merging its entries allocate and free millions
//! of small blocks. glibc keeps the freed pages in the process, so without
//! a trim they stay resident next to the tree, layout and store built
//! afterwards, and count towards the server's peak memory.

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
