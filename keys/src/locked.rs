//! A master key held in its own memory page: locked against swapping (`mlock`), left out of
//! core dumps (`MADV_DONTDUMP`), and wiped before the page is unlocked and freed.
//!
//! Both are best effort: an unprivileged process may exceed `RLIMIT_MEMLOCK`, and some
//! kernels lack `MADV_DONTDUMP`. The key works either way; [`LockedKey::is_locked`] tells
//! which, and the failure is logged at debug level.

use std::ffi::c_void;
use std::ptr::NonNull;

use zeroize::Zeroize;

use crate::MasterKey;

const PAGE: usize = 4096;

/// A page-aligned, page-sized home for one key, so that locking it locks nothing else and
/// advising it affects no other allocation.
#[repr(C, align(4096))]
struct KeyPage {
    key: MasterKey,
    _rest: [u8; PAGE - 32],
}

/// A [`MasterKey`] in locked memory. Wiped on drop.
pub struct LockedKey {
    page: Box<KeyPage>,
    locked: bool,
}

impl LockedKey {
    /// A zero key in a freshly locked page, to be filled with [`LockedKey::fill`].
    fn empty() -> LockedKey {
        let page = Box::new(KeyPage {
            key: MasterKey::from_bytes([0u8; 32]),
            _rest: [0u8; PAGE - 32],
        });
        let addr = NonNull::from(&*page).cast::<c_void>();
        // SAFETY: `addr` points to a live allocation of PAGE bytes owned by `page`; mlock and
        // madvise only change paging attributes, never the contents.
        let locked = match unsafe { nix::sys::mman::mlock(addr, PAGE) } {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "mlock of the key page failed (RLIMIT_MEMLOCK?); key may be swapped");
                false
            }
        };
        #[cfg(any(target_os = "linux", target_os = "android"))]
        // SAFETY: as above; the range is page aligned (KeyPage is 4096-aligned).
        if let Err(e) = unsafe {
            nix::sys::mman::madvise(addr, PAGE, nix::sys::mman::MmapAdvise::MADV_DONTDUMP)
        } {
            tracing::debug!(error = %e, "MADV_DONTDUMP on the key page failed");
        }
        LockedKey { page, locked }
    }

    /// Build the key in place from `f`, which writes its 32 bytes.
    pub fn fill(f: impl FnOnce(&mut [u8; 32])) -> LockedKey {
        let mut k = LockedKey::empty();
        f(k.page.key.bytes_mut());
        k
    }

    pub fn key(&self) -> &MasterKey {
        &self.page.key
    }

    /// Whether `mlock` succeeded (the key cannot be written to swap).
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Drop for LockedKey {
    fn drop(&mut self) {
        self.page.key.zeroize();
        let addr = NonNull::from(&*self.page).cast::<c_void>();
        if self.locked {
            // SAFETY: the same live page that was locked in `empty`.
            let _ = unsafe { nix::sys::mman::munlock(addr, PAGE) };
        }
        // The page goes back to the allocator: let it appear in core dumps again.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        // SAFETY: as above.
        let _ =
            unsafe { nix::sys::mman::madvise(addr, PAGE, nix::sys::mman::MmapAdvise::MADV_DODUMP) };
    }
}

impl std::fmt::Debug for LockedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockedKey(.., locked: {})", self.locked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_key_and_is_page_aligned() {
        let k = LockedKey::fill(|b| b.copy_from_slice(&[7u8; 32]));
        assert_eq!(k.key().as_bytes(), &[7u8; 32]);
        assert_eq!((&*k.page as *const KeyPage as usize) % PAGE, 0);
        assert!(format!("{k:?}").starts_with("LockedKey(.."));
    }
}
