//! The nvlist decoder against deterministic mutations of every vector in tests/data/nvlist:
//! whatever the bytes and however many descriptors come with them, `NvList::unpack` returns
//! `Ok` or `Err`, never panics, and never holds more memory than a small multiple of the
//! message; what it accepts packs again into bytes it accepts and reproduces.

use bhyve::control::nvlist::{NvError, NvList};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};

#[path = "support/nvlist_mutations.rs"]
mod mutations;

use mutations::{mutate, nested_chain, seeds, Seed, SplitMix64, TYPE_NVLIST, TYPE_NVLIST_ARRAY};

/// Counts the bytes each thread holds, so a test can see the peak of one call.
struct CountingAllocator;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// Far above any bound checked here: a decoder that asks for more is failed (the
/// allocation error aborts the test) before it can exhaust the machine.
const THREAD_HARD_LIMIT: isize = 1 << 30;

fn account(delta: isize) -> bool {
    LIVE.try_with(|live| {
        let now = live.get() + delta;
        if delta > 0 && now > THREAD_HARD_LIMIT {
            return false;
        }
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        true
    })
    .unwrap_or(true)
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping only
// touches const-initialised thread-locals without destructors, which never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !account(layout.size() as isize) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grow = new_size as isize - layout.size() as isize;
        if !account(grow) {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System.alloc` with `layout`; the contract is passed on.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if new.is_null() {
            account(-grow);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Run `f` and return its result with the most bytes it held at once on this thread.
fn peak_bytes_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let result = f();
    let peak = PEAK.with(Cell::get);
    (result, (peak - start).max(0) as usize)
}

/// What decoding an `len`-byte message may hold: pairs, names and nested lists cost a few
/// machine words for the ≥ 19 bytes each takes on the wire, with room for vectors doubling.
fn memory_bound(len: usize) -> usize {
    64 * len + 64 * 1024
}

fn dev_null() -> File {
    File::open("/dev/null").expect("open /dev/null")
}

fn descriptors(source: BorrowedFd<'_>, n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| source.try_clone_to_owned().expect("dup"))
        .collect()
}

/// Decode `bytes` with `nfds` descriptors and check everything the decoder promises.
fn check(bytes: &[u8], nfds: usize, null: BorrowedFd<'_>, what: &dyn Fn() -> String) -> bool {
    let fds = descriptors(null, nfds);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        peak_bytes_of(|| NvList::unpack(bytes, fds))
    }));
    let (result, peak) = match outcome {
        Ok(decoded) => decoded,
        Err(_) => panic!("unpack panicked on {}", what()),
    };
    assert!(
        peak <= memory_bound(bytes.len()),
        "unpack held {peak} bytes for a {}-byte message: {}",
        bytes.len(),
        what()
    );
    let Ok(list) = result else {
        return false;
    };
    // What was accepted is a list like any other: it packs, and the packing decodes to
    // a list that packs to the same bytes.
    let (packed, raw_fds) = list.pack();
    let again = NvList::unpack(&packed, descriptors(null, raw_fds.len()))
        .unwrap_or_else(|e| panic!("repacked list refused ({e}): {}", what()));
    assert_eq!(again.pack().0, packed, "repacking changed: {}", what());
    true
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().take(256).map(|b| format!("{b:02x}")).collect()
}

#[test]
fn mutated_vectors_decode_or_fail_cleanly_within_a_memory_bound() {
    const CASES: u64 = 50_000;
    let mut seeds = seeds();
    assert!(seeds.len() > 90, "only {} vectors found", seeds.len());
    for depth in [3, 100, 1000] {
        for type_code in [TYPE_NVLIST, TYPE_NVLIST_ARRAY] {
            seeds.push(Seed {
                name: format!("chain of {depth} type {type_code}"),
                bytes: nested_chain(depth, type_code),
                nfds: 0,
            });
        }
    }
    let null = dev_null();
    let (mut accepted, mut refused) = (0u64, 0u64);
    for case in 0..CASES {
        let mut rng = SplitMix64(case);
        let seed = &seeds[rng.below(seeds.len())];
        let mut bytes = seed.bytes.clone();
        for _ in 0..1 + rng.below(3) {
            mutate(&mut rng, &mut bytes, &seeds);
        }
        // Mostly the descriptors the vector came with; sometimes fewer or more.
        let nfds = match rng.below(4) {
            0 => rng.below(seed.nfds + 3),
            _ => seed.nfds,
        };
        let what = || {
            format!(
                "case {case} from {} with {nfds} fds: {}",
                seed.name,
                hex(&bytes)
            )
        };
        if check(&bytes, nfds, null.as_fd(), &what) {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    eprintln!("{CASES} mutations: {accepted} accepted, {refused} refused");
    // The mutations must reach both outcomes, or they test nothing.
    assert!(accepted > CASES / 50, "only {accepted} accepted");
    assert!(refused > CASES / 2, "only {refused} refused");
}

/// A chain of `depth` lists, each the only pair of its parent, with the sizes of a real
#[test]
fn depth_bombs_are_refused_within_a_memory_bound() {
    let null = dev_null();
    for type_code in [TYPE_NVLIST, TYPE_NVLIST_ARRAY] {
        for depth in [1000, 1024, 1025, 5000, 200_000] {
            let bytes = nested_chain(depth, type_code);
            let what = || format!("type {type_code} depth {depth}");
            let accepted = check(&bytes, 0, null.as_fd(), &what);
            assert_eq!(accepted, depth <= 1024, "{}", what());
            if !accepted {
                assert_eq!(
                    NvList::unpack(&bytes, Vec::new()).err(),
                    Some(NvError::TooDeep),
                    "{}",
                    what()
                );
            }
        }
    }
}
