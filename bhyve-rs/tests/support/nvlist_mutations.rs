//! Deterministic mutations of libnv nvlist messages, shared by the decoder's fuzz test and
//! the end-to-end one against a running bhyve.
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};

use bhyve::control::nvlist::HEADER_SIZE;

/// splitmix64: a tiny, well-mixed generator, so every case is reproducible from its number.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nvlist")
}

pub struct Seed {
    pub name: String,
    pub bytes: Vec<u8>,
    /// Descriptors the message was sent with.
    pub nfds: usize,
}

/// Every vector, with the descriptor count manifest.tsv gives for receiving it.
pub fn seeds() -> Vec<Seed> {
    let manifest = std::fs::read_to_string(data_dir().join("manifest.tsv")).expect("manifest");
    let nfds_of = |file: &str| {
        manifest
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() == 8 && f[0] == file).then(|| f[3].parse::<usize>().unwrap_or(0))
            })
            .max()
            .unwrap_or(0)
    };
    let mut names: Vec<String> = std::fs::read_dir(data_dir())
        .expect("vector directory")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".bin"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| Seed {
            bytes: std::fs::read(data_dir().join(&name)).expect("read vector"),
            nfds: nfds_of(&name),
            name,
        })
        .collect()
}

pub const TYPE_STRING: u8 = 4;
pub const TYPE_NVLIST: u8 = 5;
pub const TYPE_DESCRIPTOR: u8 = 6;
pub const TYPE_NVLIST_ARRAY: u8 = 11;
pub const TYPE_DESCRIPTOR_ARRAY: u8 = 12;
pub const TYPE_NVLIST_UP: u8 = 255;
pub const MAGIC: u8 = 0x6c;

/// Where the list headers and pair headers of a (little-endian) message start, found by
/// walking it as the decoder does; stops quietly at anything malformed.
#[derive(Default)]
pub struct Shape {
    pub list_headers: Vec<usize>,
    /// Offset and type of each pair header.
    pub pairs: Vec<(usize, u8)>,
}

pub fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

pub fn layout(bytes: &[u8]) -> Shape {
    let mut out = Shape::default();
    if bytes.len() < HEADER_SIZE {
        return out;
    }
    out.list_headers.push(0);
    let mut pos = HEADER_SIZE;
    while pos + 19 <= bytes.len() {
        if bytes[pos] == MAGIC {
            // The next element of a list array.
            out.list_headers.push(pos);
            pos += HEADER_SIZE;
            continue;
        }
        let type_code = bytes[pos];
        let namesize = u16::from_le_bytes([bytes[pos + 1], bytes[pos + 2]]) as usize;
        let Some(datasize) = le_u64(bytes, pos + 3) else {
            break;
        };
        out.pairs.push((pos, type_code));
        pos += 19 + namesize;
        match type_code {
            TYPE_NVLIST | TYPE_NVLIST_ARRAY if pos + HEADER_SIZE <= bytes.len() => {
                out.list_headers.push(pos);
                pos += HEADER_SIZE;
            }
            _ if datasize > bytes.len() as u64 => break,
            _ => pos += datasize as usize,
        }
    }
    out
}

/// Values that have broken decoders before: zero, one, sign and width boundaries, the
/// message's own length and its neighbours.
pub fn interesting(rng: &mut SplitMix64, len: usize) -> u64 {
    let len = len as u64;
    let random = rng.next();
    *rng.pick(&[
        0,
        1,
        2,
        8,
        19,
        len.saturating_sub(1),
        len,
        len + 1,
        0x7fff_ffff,
        1 << 31,
        1 << 32,
        (1 << 32) + 1,
        i64::MAX as u64,
        1 << 63,
        u64::MAX - 18,
        u64::MAX - 1,
        u64::MAX,
        random,
    ])
}

pub fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    if let Some(field) = bytes.get_mut(at..at + 8) {
        field.copy_from_slice(&value.to_le_bytes());
    }
}

/// One mutation of `bytes`; `others` supplies material to splice in.
pub fn mutate(rng: &mut SplitMix64, bytes: &mut Vec<u8>, others: &[Seed]) {
    let len = bytes.len();
    let shape = layout(bytes);
    match rng.below(12) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                if !bytes.is_empty() {
                    let at = rng.below(bytes.len());
                    bytes[at] ^= 1 << rng.below(8);
                }
            }
        }
        1 => {
            let at = rng.below(len + 1);
            let count = 1 + rng.below(8);
            let fill: Vec<u8> = (0..count).map(|_| rng.next() as u8).collect();
            bytes.splice(at..at, fill);
        }
        2 if len > 0 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(8)).min(len);
            bytes.drain(at..end);
        }
        3 => bytes.truncate(rng.below(len + 1)),
        4 if !shape.list_headers.is_empty() => {
            // nvlh_descriptors at 3, nvlh_size at 11.
            let header = *rng.pick(&shape.list_headers);
            let field = *rng.pick(&[3, 11]);
            put_u64(bytes, header + field, interesting(rng, len));
            if rng.below(4) == 0 {
                bytes[header + 2] = rng.next() as u8;
            }
        }
        5 if !shape.pairs.is_empty() => {
            let (pair, _) = *rng.pick(&shape.pairs);
            match rng.below(4) {
                0 => bytes[pair] = rng.next() as u8,
                1 => {
                    let namesize = *rng.pick(&[0u16, 1, 2, 2047, 2048, 2049, u16::MAX]);
                    bytes[pair + 1..pair + 3].copy_from_slice(&namesize.to_le_bytes());
                }
                // datasize at 3, nitems at 11.
                2 => put_u64(bytes, pair + 3, interesting(rng, len)),
                _ => put_u64(bytes, pair + 11, interesting(rng, len)),
            }
        }
        6 if !shape.pairs.is_empty() => {
            // A string or a name that loses its terminating NUL.
            let (pair, type_code) = *rng.pick(&shape.pairs);
            let namesize = u16::from_le_bytes([bytes[pair + 1], bytes[pair + 2]]) as usize;
            let name_end = pair + 19 + namesize;
            let datasize = le_u64(bytes, pair + 3).unwrap_or(0) as usize;
            let at = if type_code == TYPE_STRING && rng.below(2) == 0 {
                name_end.saturating_add(datasize)
            } else {
                name_end
            };
            if let Some(byte) = at.checked_sub(1).and_then(|at| bytes.get_mut(at)) {
                *byte = b'A';
            }
        }
        7 if !shape.pairs.is_empty() => {
            // A pair repeated right after itself: duplicate names, or a second nested list.
            let (pair, _) = *rng.pick(&shape.pairs);
            let end = shape
                .pairs
                .iter()
                .map(|(at, _)| *at)
                .chain(shape.list_headers.iter().copied())
                .filter(|at| *at > pair)
                .min()
                .unwrap_or(len);
            let copy = bytes[pair..end].to_vec();
            bytes.splice(end..end, copy);
        }
        8 => {
            // A piece of another message.
            let other = &rng.pick(others).bytes;
            if !other.is_empty() {
                let from = rng.below(other.len());
                let to = (from + 1 + rng.below(64)).min(other.len());
                let at = rng.below(len + 1);
                bytes.splice(at..at, other[from..to].iter().copied());
            }
        }
        9 => {
            // Descriptor indices past, at, and below what was received.
            for (pair, type_code) in &shape.pairs {
                if matches!(*type_code, TYPE_DESCRIPTOR | TYPE_DESCRIPTOR_ARRAY) {
                    let namesize = u16::from_le_bytes([bytes[pair + 1], bytes[pair + 2]]);
                    let value = *rng.pick(&[0, 1, 2, 3, 85, u64::MAX, 1 << 63, 1 << 32]);
                    put_u64(bytes, pair + 19 + namesize as usize, value);
                }
            }
        }
        10 => {
            // Every list array announces as many elements as the bytes after it could hold.
            for (pair, type_code) in &shape.pairs {
                if *type_code == TYPE_NVLIST_ARRAY {
                    let namesize = u16::from_le_bytes([bytes[pair + 1], bytes[pair + 2]]);
                    let left = len.saturating_sub(pair + 19 + namesize as usize);
                    put_u64(bytes, pair + 11, (left / HEADER_SIZE) as u64);
                }
            }
        }
        _ => {
            // An early closing marker where a pair was.
            if let Some((pair, _)) = shape.pairs.get(rng.below(shape.pairs.len().max(1))) {
                bytes[*pair] = *rng.pick(&[TYPE_NVLIST_UP, 254]);
            }
        }
    }
    // Often make the top header agree with the new length, so the mutation reaches the
    // pairs instead of failing the size check.
    if bytes.len() >= HEADER_SIZE && rng.below(2) == 0 {
        let size = (bytes.len() - HEADER_SIZE) as u64;
        put_u64(bytes, 11, size);
    }
}

/// packing but no closing markers (libnv tolerates their absence at the end).
pub fn nested_chain(depth: usize, type_code: u8) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut headers = vec![0];
    bytes.extend_from_slice(&[MAGIC, 0, 0]);
    bytes.extend_from_slice(&[0; 16]);
    for _ in 0..depth {
        bytes.push(type_code);
        bytes.extend_from_slice(&2u16.to_le_bytes());
        let (datasize, nitems) = if type_code == TYPE_NVLIST_ARRAY {
            (0u64, 1u64)
        } else {
            (HEADER_SIZE as u64, 0)
        };
        bytes.extend_from_slice(&datasize.to_le_bytes());
        bytes.extend_from_slice(&nitems.to_le_bytes());
        bytes.extend_from_slice(b"n\0");
        headers.push(bytes.len());
        bytes.extend_from_slice(&[MAGIC, 0, 0]);
        bytes.extend_from_slice(&[0; 16]);
    }
    let len = bytes.len();
    for at in headers {
        put_u64(&mut bytes, at + 11, (len - at - HEADER_SIZE) as u64);
    }
    bytes
}
