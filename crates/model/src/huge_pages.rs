//! Large arrays read at random places, kept on the operating system's huge pages where it
//! offers them, so that a read far from the last one does not also miss the TLB.
//! Runs on: whichever thread builds them (loading a model: the worker or an offline thread);
//! once built they are read-only slices, shared by any thread.
//!
//! Why: the tune memory's index is about 12 MB of arrays that each step reads in a few random
//! places, and the fast step reads a few random rows of its side tables (2.3 MB for the
//! built-in model). On 4 KiB pages each of those reads needs its own TLB entry, and a
//! page-table walk when it has none, which under a hypervisor's nested paging can cost more
//! than the read itself. On 2 MiB pages the whole index needs seven entries.
//!
//! How: on Linux an array of at least `MIN_HUGE_BYTES` gets fresh pages of its own from `mmap`,
//! on a 2 MiB boundary and rounded up to whole 2 MiB pages, and `madvise(MADV_HUGEPAGE)` asks
//! for transparent huge pages before the first write faults them in. (Memory from the
//! allocator would not do: pages it has used before keep the 4 KiB pages they were given.)
//! The kernel grants them where transparent huge pages are `always` or `madvise` (most
//! distributions' default) and a free 2 MiB page can be found, and uses 4 KiB pages otherwise;
//! either way the array is the same. The rounding costs at most 2 MiB of memory an array.
//! Smaller arrays, and other systems, get an ordinary allocation.
//!
//! Every array starts on a cache line (huge pages trivially, smaller arrays by their layout),
//! which the packed weights of the generation step need: a 64-byte vector load from an
//! address off a line's boundary reads two lines, and made the step's integer products about
//! a third slower (see `docs/experiments/speed.md`).

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::Deref;
use std::ptr::NonNull;

/// Size of a huge page on x86-64 and AArch64 Linux (with 4 KiB base pages).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const HUGE_PAGE_BYTES: usize = 2 << 20;
/// Bytes of a cache line: every array starts on one.
const CACHE_LINE_BYTES: usize = 64;
/// Arrays smaller than this keep an ordinary allocation: rounding them up to a huge page would
/// cost more memory than they hold.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const MIN_HUGE_BYTES: usize = HUGE_PAGE_BYTES / 2;

/// A fixed-length array of plain values, starting on a cache line, on huge pages where the
/// system gives them (see the module's notes). Reads as a slice.
pub struct HugePageArray<T: Copy> {
    /// Its first element (dangling when empty).
    ptr: NonNull<T>,
    len: usize,
    memory: Memory,
}

/// Where a `HugePageArray`'s elements live, and so how they are given back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Memory {
    /// Nothing: the array is empty or its elements take no bytes.
    None,
    /// An ordinary allocation of the global allocator.
    Heap(Layout),
    /// Fresh anonymous pages of this many bytes from `mmap`, advised for huge pages.
    #[cfg(target_os = "linux")]
    HugePages(usize),
}

// SAFETY: the array owns its elements as a `Box<[T]>` would, and hands out only shared
// references to them, so it crosses threads exactly when `T` does.
unsafe impl<T: Copy + Send> Send for HugePageArray<T> {}
// SAFETY: as above; `&HugePageArray<T>` gives nothing but `&[T]`.
unsafe impl<T: Copy + Sync> Sync for HugePageArray<T> {}

impl<T: Copy> HugePageArray<T> {
    /// A copy of `items`.
    pub fn from_slice(items: &[T]) -> Self {
        let bytes = std::mem::size_of_val(items);
        if bytes == 0 {
            return Self { ptr: NonNull::dangling(), len: items.len(), memory: Memory::None };
        }
        let (raw, memory) = match map_huge_pages(bytes) {
            Some((raw, mapped)) => (raw.cast::<T>(), mapped),
            None => {
                let layout = Layout::array::<T>(items.len())
                    .and_then(|layout| layout.align_to(CACHE_LINE_BYTES))
                    .expect("a slice's own layout, aligned to a cache line, is valid");
                // SAFETY: the layout's size, `bytes`, is not zero.
                let raw = unsafe { alloc::alloc(layout) };
                let Some(raw) = NonNull::new(raw.cast::<T>()) else { alloc::handle_alloc_error(layout) };
                (raw, Memory::Heap(layout))
            }
        };
        // SAFETY: the new memory holds `bytes` bytes aligned for `T` (a page boundary, or a
        // cache line at least as aligned as `T`'s own layout) and cannot overlap `items`.
        unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), raw.as_ptr(), items.len()) };
        Self { ptr: raw, len: items.len(), memory }
    }

    /// Whether it lives in memory advised for huge pages (the kernel may still have given it
    /// 4 KiB ones).
    pub fn is_on_huge_pages(&self) -> bool {
        #[cfg(target_os = "linux")]
        if let Memory::HugePages(_) = self.memory {
            return true;
        }
        false
    }
}

/// Fresh pages for `bytes` bytes, on a huge-page boundary and rounded up to whole huge pages,
/// advised for transparent huge pages before anything touches them (pages an allocator hands
/// back already touched keep their 4 KiB pages); `None` for a small array, another system, or
/// a failed `mmap`.
fn map_huge_pages(bytes: usize) -> Option<(NonNull<u8>, Memory)> {
    #[cfg(target_os = "linux")]
    if bytes >= MIN_HUGE_BYTES {
        let len = bytes.checked_next_multiple_of(HUGE_PAGE_BYTES)?;
        let span = len.checked_add(HUGE_PAGE_BYTES)?;
        // SAFETY: a new private anonymous mapping aliases nothing; failure is checked.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        let head = (raw as usize).next_multiple_of(HUGE_PAGE_BYTES) - raw as usize;
        let tail = span - head - len;
        // SAFETY: `head` and `tail` are the page-aligned ends of the mapping just made, outside
        // `[start, start + len)`, which is kept; `madvise` only hints at that range's pages.
        unsafe {
            let start = raw.cast::<u8>().add(head);
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap(start.add(len).cast(), tail);
            }
            libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE);
            return Some((NonNull::new(start)?, Memory::HugePages(len)));
        }
    }
    let _ = bytes;
    None
}

impl<T: Copy> Deref for HugePageArray<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialised `T`s (or is dangling with `len` 0 or `T`
        // zero-sized), owned by `self` and never written after `from_slice`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> Drop for HugePageArray<T> {
    fn drop(&mut self) {
        match self.memory {
            Memory::None => {}
            // SAFETY: `ptr` came from `alloc::alloc` with this layout and is freed once.
            Memory::Heap(layout) => unsafe { alloc::dealloc(self.ptr.as_ptr().cast(), layout) },
            // SAFETY: `ptr` starts the `len` bytes `map_huge_pages` kept mapped; unmapped once.
            #[cfg(target_os = "linux")]
            Memory::HugePages(len) => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), len);
            },
        }
    }
}

impl<T: Copy> Clone for HugePageArray<T> {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl<T: Copy> From<Vec<T>> for HugePageArray<T> {
    fn from(items: Vec<T>) -> Self {
        Self::from_slice(&items)
    }
}

impl<T: Copy> fmt::Debug for HugePageArray<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HugePageArray")
            .field("len", &self.len)
            .field("on_huge_pages", &self.is_on_huge_pages())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_of_every_size_hold_what_they_were_given() {
        for len in [0, 1, 1000, MIN_HUGE_BYTES / 4 - 1, MIN_HUGE_BYTES / 4, 3 * HUGE_PAGE_BYTES / 4 + 5] {
            let items: Vec<u32> = (0..len as u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
            let array = HugePageArray::from_slice(&items);
            assert_eq!(&array[..], &items[..], "{len} items");
            if len > 0 {
                assert_eq!(array.as_ptr() as usize % CACHE_LINE_BYTES, 0, "{len} items start a line");
            }
            assert_eq!(array.clone()[..], items[..], "a clone of {len} items");
            let large = len * 4 >= MIN_HUGE_BYTES;
            assert_eq!(array.is_on_huge_pages(), large && cfg!(target_os = "linux"), "{len} items");
            if array.is_on_huge_pages() {
                assert_eq!(array.as_ptr() as usize % HUGE_PAGE_BYTES, 0);
            }
        }
        let bytes = HugePageArray::from(vec![7u8; MIN_HUGE_BYTES + 1]);
        assert!(bytes.iter().all(|&b| b == 7) && bytes.len() == MIN_HUGE_BYTES + 1);
        let empty: HugePageArray<u64> = HugePageArray::from(Vec::new());
        assert!(empty.is_empty() && !empty.is_on_huge_pages());
    }

    /// The `VmFlags` line of the mapping of this process that holds `address`.
    #[cfg(target_os = "linux")]
    fn mapping_flags(address: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().and_then(|first| first.split_once('-'));
            let bounds = range.and_then(|(start, end)| {
                Some((usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?))
            });
            if let Some((start, end)) = bounds {
                inside = (start..end).contains(&address);
            } else if inside && line.starts_with("VmFlags:") {
                return Some(line.to_string());
            }
        }
        None
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_large_array_is_advised_for_huge_pages_where_the_kernel_has_them() {
        let array = HugePageArray::from(vec![1u32; HUGE_PAGE_BYTES / 4 + 1]);
        let flags =
            mapping_flags(array.as_ptr() as usize).expect("the array's mapping is in /proc/self/smaps");
        // `hg`: the mapping was advised with MADV_HUGEPAGE (a kernel without transparent huge
        // pages refuses the advice, and has no such directory).
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            assert!(flags.split_whitespace().any(|flag| flag == "hg"), "{flags}");
        }
        let small = HugePageArray::from(vec![1u32; 1000]);
        assert!(!small.is_on_huge_pages());
    }
}
