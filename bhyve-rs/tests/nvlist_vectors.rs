//! The nvlist codec against libnv's own output and verdicts (tests/data/nvlist/).

use std::fmt::Write as _;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use bhyve::control::nvlist::{NvError, NvList, NvValue};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nvlist")
}

fn vector(name: &str) -> Vec<u8> {
    let path = data_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `n` descriptors to hand to the decoder, as a receiver would have them.
fn descriptors(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| OwnedFd::from(File::open("/dev/null").expect("open /dev/null")))
        .collect()
}

struct Check {
    file: String,
    mode: String,
    flags: u8,
    nfds: usize,
    origin: String,
    accepted: bool,
    errno: String,
    list: String,
}

fn manifest() -> Vec<Check> {
    let text = std::fs::read_to_string(data_dir().join("manifest.tsv")).expect("manifest.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 8, "manifest line: {line}");
            Check {
                file: f[0].into(),
                mode: f[1].into(),
                flags: f[2].parse().expect("flags"),
                nfds: f[3].parse().expect("nfds"),
                origin: f[4].into(),
                accepted: f[5] == "1",
                errno: f[6].into(),
                list: f[7].into(),
            }
        })
        .collect()
}

/// Render a list the way manifest.tsv does (Python's compact JSON with sorted keys).
fn render(list: &NvList) -> String {
    let mut out = String::new();
    render_list(list, &mut out);
    out
}

fn json_string(bytes: &[u8], out: &mut String) {
    out.push('"');
    for c in String::from_utf8_lossy(bytes).chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn render_list(list: &NvList, out: &mut String) {
    let _ = write!(out, "{{\"flags\":{},\"pairs\":[", list.flags());
    for (i, pair) in list.pairs().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"name\":");
        json_string(pair.name(), out);
        let type_name = pair.value().type_name().replace(' ', "_");
        let _ = write!(out, ",\"type\":\"{type_name}\",\"value\":");
        render_value(pair.value(), out);
        out.push('}');
    }
    out.push_str("]}");
}

fn render_items<T>(items: &[T], out: &mut String, mut one: impl FnMut(&T, &mut String)) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        one(item, out);
    }
    out.push(']');
}

fn render_value(value: &NvValue, out: &mut String) {
    match value {
        NvValue::Null => out.push_str("null"),
        NvValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        NvValue::Number(n) => {
            let _ = write!(out, "\"0x{n:016x}\"");
        }
        NvValue::String(s) => json_string(s, out),
        NvValue::NvList(l) => render_list(l, out),
        NvValue::Descriptor(_) => out.push_str("{\"fd_valid\":true}"),
        NvValue::Binary(b) => {
            out.push('"');
            for byte in b {
                let _ = write!(out, "{byte:02x}");
            }
            out.push('"');
        }
        NvValue::BoolArray(v) => render_items(v, out, |b, o| o.push(if *b { '1' } else { '0' })),
        NvValue::NumberArray(v) => render_items(v, out, |n, o| {
            let _ = write!(o, "\"0x{n:016x}\"");
        }),
        NvValue::StringArray(v) => render_items(v, out, |s, o| json_string(s, o)),
        NvValue::NvListArray(v) => render_items(v, out, render_list),
        NvValue::DescriptorArray(v) => {
            render_items(v, out, |_, o| o.push_str("{\"fd_valid\":true}"))
        }
    }
}

fn errno_matches(err: &NvError, expected: &str) -> bool {
    match expected {
        "EINVAL" => matches!(err, NvError::Invalid(_)),
        "EILSEQ" => matches!(err, NvError::FlagsMismatch { .. }),
        "EEXIST" => matches!(err, NvError::Duplicate(_)),
        // libnv fails on an unbalanced marker without setting errno, leaving 0 or a stale value.
        "0" | "ENOENT" => matches!(err, NvError::UnbalancedMarker),
        _ => false,
    }
}

/// Where this codec knowingly differs from libnv (see the module documentation).
fn deviation(check: &Check) -> Option<&'static str> {
    match (check.file.as_str(), check.mode.as_str()) {
        // libnv does not byte-swap a foreign-endian array count and so refuses the list.
        ("h-big-endian-number-array.bin", "unpack") => Some("big-endian array accepted"),
        // libnv's nvlist_recv converts a foreign-endian header twice and refuses it.
        ("h-big-endian-checkpoint.bin", "recv") | ("h-big-endian-scalars.bin", "recv") => {
            Some("big-endian list received")
        }
        // libnv keeps the raw bool-array byte; this codec stores bools.
        ("h-bool-array-value-2.bin", _) => Some("bool-array byte 2 read as true"),
        _ => None,
    }
}

#[test]
fn manifest_lists_every_vector_file() {
    let checks = manifest();
    assert!(checks.len() >= 100);
    for check in &checks {
        assert!(data_dir().join(&check.file).exists(), "{}", check.file);
    }
}

#[test]
fn every_vector_gets_libnv_verdict_and_decoded_value() {
    let mut failures = Vec::new();
    for check in manifest() {
        let bytes = vector(&check.file);
        let fds = if check.mode == "recv" {
            descriptors(check.nfds)
        } else {
            Vec::new()
        };
        let result = NvList::unpack_with_flags(&bytes, fds, check.flags);
        let what = format!(
            "{} ({} {}/{})",
            check.file, check.mode, check.flags, check.nfds
        );
        match (deviation(&check), check.accepted, result) {
            (Some(_), _, Ok(_)) => {}
            (Some(why), _, Err(e)) => failures.push(format!("{what}: expected '{why}', got {e}")),
            (None, true, Ok(list)) => {
                let got = render(&list);
                // The manifest abbreviates two huge lists; their bytes are compared exactly
                // by the repack test instead.
                let abbreviated = check.list.contains("\"...\"") || check.list.contains("bytes of");
                if !abbreviated && got != check.list {
                    failures.push(format!(
                        "{what}: decoded\n  {got}\nexpected\n  {}",
                        check.list
                    ));
                }
            }
            (None, true, Err(e)) => failures.push(format!("{what}: refused: {e}")),
            (None, false, Ok(list)) => failures.push(format!("{what}: accepted {}", render(&list))),
            (None, false, Err(e)) => {
                if !errno_matches(&e, &check.errno) {
                    failures.push(format!("{what}: {e:?}, libnv says {}", check.errno));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn libnv_produced_vectors_repack_byte_for_byte() {
    let mut count = 0;
    for check in manifest() {
        if !check.accepted || !check.origin.starts_with("libnv") {
            continue;
        }
        let bytes = vector(&check.file);
        let fds = descriptors(check.nfds);
        let list = NvList::unpack_with_flags(&bytes, fds, check.flags)
            .unwrap_or_else(|e| panic!("{}: {e}", check.file));
        let (packed, packed_fds) = list.pack();
        assert_eq!(packed, bytes, "{}", check.file);
        assert_eq!(packed_fds.len(), check.nfds, "{}", check.file);
        count += 1;
    }
    assert!(count >= 30, "only {count} libnv-produced vectors");
}

#[test]
fn accepted_odd_vectors_repack_to_an_equal_list() {
    for check in manifest() {
        if !check.accepted || check.origin.starts_with("libnv") {
            continue;
        }
        let bytes = vector(&check.file);
        let first = NvList::unpack_with_flags(&bytes, descriptors(check.nfds), check.flags)
            .unwrap_or_else(|e| panic!("{}: {e}", check.file));
        let (packed, fds) = first.pack();
        let second = NvList::unpack_with_flags(&packed, descriptors(fds.len()), check.flags)
            .unwrap_or_else(|e| panic!("{} repacked: {e}", check.file));
        assert_eq!(render(&first), render(&second), "{}", check.file);
    }
}

#[test]
fn bhyvectl_request_vectors_decode_to_the_checkpoint_command() {
    for (file, suspend) in [
        ("bhyvectl-checkpoint.bin", false),
        ("bhyvectl-suspend.bin", true),
    ] {
        let list = NvList::unpack(&vector(file), descriptors(1)).expect(file);
        assert_eq!(list.get_string("cmd"), Some("checkpoint"));
        assert_eq!(list.get_string("filename"), Some("snap"));
        assert_eq!(list.get_bool("suspend"), Some(suspend));
        assert!(list.get_descriptor("fddir").is_some());
        // Without the descriptor, as nvlist_unpack() sees it, the request is refused.
        assert!(matches!(
            NvList::unpack(&vector(file), Vec::new()),
            Err(NvError::Invalid(_))
        ));
    }
}

#[test]
fn stream_captures_are_the_list_then_one_zero_byte() {
    for name in [
        "bhyvectl-checkpoint",
        "bhyvectl-suspend",
        "descriptor",
        "descriptor-array",
    ] {
        let list = vector(&format!("{name}.bin"));
        let stream = vector(&format!("{name}.stream.bin"));
        assert_eq!(&stream[..list.len()], &list[..], "{name}");
        assert_eq!(&stream[list.len()..], &[0u8], "{name}");
    }
}

/// A small deterministic generator so the fuzz cases are the same on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(rng: &mut XorShift, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(3) {
        match rng.below(7) {
            0 => out.truncate(rng.below(out.len() + 1)),
            1 => {
                if !out.is_empty() {
                    let i = rng.below(out.len());
                    out[i] ^= 1 << rng.below(8);
                }
            }
            2 => {
                if !out.is_empty() {
                    let i = rng.below(out.len());
                    out[i] = rng.next() as u8;
                }
            }
            3 => {
                // A random or extreme 64-bit length/count at some offset.
                let value = match rng.below(4) {
                    0 => u64::MAX,
                    1 => u64::MAX - 18,
                    2 => 1u64 << rng.below(64),
                    _ => rng.next(),
                };
                if out.len() >= 8 {
                    let i = rng.below(out.len() - 7);
                    out[i..i + 8].copy_from_slice(&value.to_le_bytes());
                }
            }
            4 => {
                let i = rng.below(out.len() + 1);
                let n = rng.below(40);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(i..i, bytes);
            }
            5 => {
                if !out.is_empty() {
                    let i = rng.below(out.len());
                    let n = rng.below(out.len() - i + 1);
                    out.drain(i..i + n);
                }
            }
            _ => {
                // Keep the top header's size consistent so mutations reach the pairs.
                if out.len() >= 19 {
                    let size = (out.len() - 19) as u64;
                    out[11..19].copy_from_slice(&size.to_le_bytes());
                }
            }
        }
    }
    out
}

#[test]
fn mutated_vectors_never_panic() {
    let mut inputs: Vec<Vec<u8>> = manifest()
        .iter()
        .filter(|c| c.file != "nested-depth-1000.bin" && !c.file.starts_with("name-max"))
        .map(|c| vector(&c.file))
        .collect();
    inputs.dedup();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    let cases = 30_000;
    for case in 0..cases {
        let base = &inputs[case % inputs.len()];
        let bytes = mutate(&mut rng, base);
        let nfds = rng.below(5);
        let flags = if rng.below(8) == 0 {
            rng.below(4) as u8
        } else {
            0
        };
        if let Ok(list) = NvList::unpack_with_flags(&bytes, descriptors(nfds), flags) {
            accepted += 1;
            // Whatever was accepted packs and decodes again.
            let (packed, fds) = list.pack();
            let again = NvList::unpack_with_flags(&packed, descriptors(fds.len()), flags)
                .unwrap_or_else(|e| panic!("case {case}: repacked list refused: {e}"));
            assert_eq!(render(&again), render(&list), "case {case}");
        }
    }
    // The mutations must not be so destructive that nothing gets past the header.
    assert!(
        accepted > 100,
        "only {accepted} of {cases} mutated inputs decoded"
    );
}

#[test]
fn deep_vector_decodes_and_big_mutations_never_panic() {
    let deep = vector("nested-depth-1000.bin");
    let list = NvList::unpack(&deep, Vec::new()).expect("1000 levels");
    assert_eq!(list.pack().0, deep);
    let mut rng = XorShift(7);
    for _ in 0..200 {
        let _ = NvList::unpack(&mutate(&mut rng, &deep), Vec::new());
    }
}

/// Write `bytes` to a stream socket followed by `nfds` descriptors the way libnv sends them.
fn send_as_libnv(sock: &std::os::unix::net::UnixStream, bytes: &[u8], nfds: usize) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    use std::io::{IoSlice, Write};
    use std::os::fd::AsRawFd;
    let mut writer = sock;
    writer.write_all(bytes).expect("write list");
    if nfds > 0 {
        let fds = descriptors(nfds);
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs: Vec<ControlMessage<'_>> = raw.chunks(1).map(ControlMessage::ScmRights).collect();
        let dummy = [0u8];
        sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &[IoSlice::new(&dummy)],
            &cmsgs,
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
    }
}

#[test]
fn recv_vectors_get_libnv_verdict_over_a_real_socket() {
    use bhyve::control::transport::{nvlist_recv, RecvLimits};
    let mut failures = Vec::new();
    for check in manifest().into_iter().filter(|c| c.mode == "recv") {
        assert_eq!(check.flags, 0, "bhyve receives with flags 0");
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        send_as_libnv(&a, &vector(&check.file), check.nfds);
        drop(a);
        let result = nvlist_recv(&b, RecvLimits::CONTROL);
        match (deviation(&check), check.accepted, result) {
            (Some(_), _, Ok(_)) => {}
            (None, true, Ok(list)) => assert_eq!(render(&list), check.list, "{}", check.file),
            (None, false, Err(_)) => {}
            (_, _, Ok(list)) => {
                failures.push(format!("{}: accepted {}", check.file, render(&list)))
            }
            (_, _, Err(e)) => failures.push(format!("{}: refused: {e}", check.file)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
