//! What the disk tests share: the guest's fill pattern and checksum, a disk image whose sectors
//! are told apart, and a checkpoint and a suspend while the guest streams writes to its disk.

use std::path::{Path, PathBuf};

use super::control::Scratch;
use super::guest::splitmix64;

/// Sectors of [`disk_image`].
pub const DISK_SECTORS: u64 = 2048;

/// `sectors` sectors of the guest's fill pattern for `seed`: splitmix64 words, little endian.
pub fn pattern(seed: u64, sectors: u64) -> Vec<u8> {
    let mut state = seed;
    (0..sectors * 512 / 8)
        .flat_map(|_| splitmix64(&mut state).to_le_bytes())
        .collect()
}

/// The guest's checksum: FNV-1a 64 over little-endian 64-bit words.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
            (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// A 1 MiB disk whose sector n holds the byte n % 251.
pub fn disk_image(scratch: &Scratch) -> PathBuf {
    let path = scratch.path("disk.img");
    let data: Vec<u8> = (0..DISK_SECTORS * 512)
        .map(|i| ((i / 512) % 251) as u8)
        .collect();
    std::fs::write(&path, data).unwrap();
    path
}

/// `count` units of `unit` bytes of the file, from unit `first`.
pub fn file_range(path: &Path, first: u64, count: u64, unit: u64) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    data[(first * unit) as usize..((first + count) * unit) as usize].to_vec()
}

/// The round trip every disk driver of the guest answers alike: `<tool> write 8 COUNT 42`
/// with the pattern's checksum, `<tool> flush`, the host file holding the write, the same
/// read back, and sectors 1000..1128, untouched, as the file has them. `ok` is how `tool`
/// reports success (`status 0`, `status 0x0`, `ok`).
pub fn write_flush_read(vm: &mut super::Console, image: &Path, tool: &str, ok: &str, count: u64) {
    let written = pattern(42, count);
    assert_eq!(
        vm.command_line(&format!("{tool} write 8 {count} 42")),
        format!("{tool} write 8 {count} {ok} fnv {:#018x}", fnv(&written))
    );
    assert_eq!(
        vm.command_line(&format!("{tool} flush")),
        format!("{tool} flush {ok}")
    );
    assert_eq!(
        file_range(image, 8, count, 512),
        written,
        "the host file holds the write"
    );
    assert_eq!(
        vm.command_line(&format!("{tool} read 8 {count}")),
        format!("{tool} read 8 {count} {ok} fnv {:#018x}", fnv(&written))
    );
    let untouched = file_range(image, 1000, 128, 512);
    assert_eq!(
        vm.command_line(&format!("{tool} read 1000 128")),
        format!("{tool} read 1000 128 {ok} fnv {:#018x}", fnv(&untouched))
    );
}

/// The last `<tool> stream round N` line of a transcript.
#[cfg(feature = "bhyve_snapshot")]
pub fn last_round(transcript: &str, tool: &str) -> u64 {
    let prefix = format!("{tool} stream round ");
    transcript
        .lines()
        .rev()
        .filter_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .find_map(|n| n.parse().ok())
        .unwrap_or(0)
}

/// With the guest's `<tool> stream 64` running on `vm` (VM `name`, run directory `scratch`):
/// a checkpoint, 200 more rounds, a suspend, a restore and 200 more rounds; then the stream is
/// stopped, must have counted no error and the guest must not have rebooted. Returns the
/// restored VM at its prompt, the file flushed, and the round the stream stopped at, which the
/// disk's first 64 sectors hold.
#[cfg(feature = "bhyve_snapshot")]
pub fn snapshot_while_streaming(
    scratch: &Scratch,
    name: &str,
    mut vm: super::Console,
    tool: &str,
) -> (super::Console, u64) {
    use super::control::{ctl, suspend};
    use super::{guest, Console, COMMAND_TIMEOUT};
    use std::time::Duration;

    vm.send_line(&format!("{tool} stream 64"));
    vm.expect(&format!("{tool} stream round 100\n"), COMMAND_TIMEOUT);
    let live = scratch.path("live.snap");
    let (code, err) = ctl(
        &scratch.0,
        name,
        &[format!("--checkpoint={}", live.display())],
    );
    assert_eq!(code, 0, "bhyvectl --checkpoint failed: {err}");
    let next = last_round(&vm.transcript(), tool) + 200;
    vm.expect(&format!("{tool} stream round {next}\n"), COMMAND_TIMEOUT);

    let file = scratch.path("suspend.snap");
    suspend(scratch, name, &mut vm, &file);
    let suspended_at = last_round(&vm.transcript(), tool);
    let mut cmd = super::bhyve();
    cmd.arg("-r").arg(&file);
    cmd.arg("-o").arg(format!("rundir={}", scratch.0.display()));
    let mut vm = Console::spawn("bhyve -r", cmd);
    vm.expect(
        &format!("{tool} stream round {}\n", suspended_at + 200),
        Duration::from_secs(60),
    );
    vm.send("\n");
    let stopped = vm.expect("errors ", COMMAND_TIMEOUT);
    let line = vm.expect("\n", COMMAND_TIMEOUT);
    assert!(
        !vm.transcript().contains(guest::READY),
        "the guest rebooted"
    );
    assert_eq!(
        line.trim(),
        "0",
        "stream errors after restore: {stopped}{line}"
    );
    let round: u64 = stopped
        .rsplit("stopped round ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{stopped}"));
    vm.expect_prompt(COMMAND_TIMEOUT);
    (vm, round)
}
