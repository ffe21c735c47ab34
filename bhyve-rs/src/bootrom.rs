//! Boot ROM (`-l bootrom,CODE[,VARS]`), as FreeBSD's `usr.sbin/bhyve/bootrom.c` provides it.
//!
//! The top 16 MiB below 4 GiB are the ROM area. The code image is copied into memory the guest
//! can read and execute but not write, placed so that it ends at 4 GiB: its last 16 bytes hold
//! the reset vector, where a vCPU starts after reset (real mode, CS base 0xFFFF0000, IP 0xFFF0).
//! A variable store file, when given, sits right below the code. Like bhyve, it is not plain
//! memory: it is the file itself, mapped shared so writes persist, behind a small emulation of
//! the CFI flash commands EDK II uses to decide that its variable volume is writable.
//!
//! Sizes follow bhyve: the code must be a non-empty multiple of the page size, the store at
//! least one page, and both together at most 16 MiB.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::sync::{Arc, Mutex};

use memmap2::{MmapMut, MmapOptions};
use nix::fcntl::{Flock, FlockArg};

use crate::bus::{BusError, Buses};
use crate::config::Config;
use crate::memory::GuestRegion;

/// Size of the ROM area below 4 GiB.
pub const BOOTROM_SIZE: u64 = 16 << 20;
const FOUR_GIB: u64 = 1 << 32;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootRomError {
    #[error("Error opening bootrom \"{path}\": {reason}")]
    Open { path: String, reason: String },
    #[error("ROM size {0} is invalid")]
    Size(u64),
    #[error("ROM size {0} is not a multiple of the page size")]
    NotPageMultiple(u64),
    #[error("Incomplete read of bootrom file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("Error opening bootrom variable file \"{path}\": {reason}")]
    OpenVars { path: String, reason: String },
    #[error("Invalid bootrom variable size {0}")]
    VarsSize(u64),
    #[error("Invalid bootrom and variable aggregate size {0}")]
    TotalSize(u64),
    #[error("bootrom variable file \"{path}\": cannot map it: {reason}")]
    MapVars { path: String, reason: String },
    #[error("bootrom: {0}")]
    Memory(String),
    #[error("bootrom variable store: {0}")]
    Bus(#[from] BusError),
}

fn describe(e: &std::io::Error) -> String {
    crate::vmm::describe_io_error(e)
}

/// The code image, read and checked, and the variable store, opened; nothing is mapped yet.
pub struct BootRom {
    code: GuestRegion,
    vars: Option<VarStore>,
}

struct VarStore {
    /// Locked for as long as this VM has it mapped.
    file: Flock<File>,
    path: String,
    size: u64,
}

impl BootRom {
    /// Read `lpc.bootrom` and open `lpc.bootvars`; `None` without a boot ROM.
    pub fn load(config: &Config) -> Result<Option<Self>, BootRomError> {
        let Some(path) = config.get("lpc.bootrom") else {
            return Ok(None);
        };
        let open_error = |e: std::io::Error| BootRomError::Open {
            path: path.to_string(),
            reason: describe(&e),
        };
        let mut file = File::open(path).map_err(open_error)?;
        let size = file.metadata().map_err(open_error)?.len();
        if size == 0 || size > BOOTROM_SIZE {
            return Err(BootRomError::Size(size));
        }
        if size % PAGE_SIZE != 0 {
            return Err(BootRomError::NotPageMultiple(size));
        }

        let vars = match config.get("lpc.bootvars") {
            None => None,
            Some(vars_path) => {
                let open_error = |e: std::io::Error| BootRomError::OpenVars {
                    path: vars_path.to_string(),
                    reason: describe(&e),
                };
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(vars_path)
                    .map_err(open_error)?;
                // One VM at a time: the store is mapped shared and must keep its size while
                // mapped (a shorter file would fault). The lock goes with the descriptor.
                let file =
                    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
                        BootRomError::OpenVars {
                            path: vars_path.to_string(),
                            reason: format!("in use by another process ({})", e.desc()),
                        }
                    })?;
                let size = file.metadata().map_err(open_error)?.len();
                if !(PAGE_SIZE..=BOOTROM_SIZE).contains(&size) {
                    return Err(BootRomError::VarsSize(size));
                }
                Some(VarStore {
                    file,
                    path: vars_path.to_string(),
                    size,
                })
            }
        };
        let total = size + vars.as_ref().map_or(0, |v| v.size);
        if total > BOOTROM_SIZE {
            return Err(BootRomError::TotalSize(total));
        }

        let mut image = MmapOptions::new()
            .len(size as usize)
            .map_anon()
            .map_err(|e| BootRomError::Memory(e.to_string()))?;
        file.read_exact(&mut image)
            .map_err(|e| BootRomError::Read {
                path: path.to_string(),
                reason: describe(&e),
            })?;
        Ok(Some(Self {
            code: GuestRegion::from_mapping(FOUR_GIB - size, image),
            vars,
        }))
    }

    /// The code image, ending at 4 GiB; the hypervisor maps it read-only.
    pub fn code(&self) -> &GuestRegion {
        &self.code
    }

    /// Guest-physical range of the variable store, if any: right below the code.
    pub fn vars_range(&self) -> Option<(u64, u64)> {
        self.vars
            .as_ref()
            .map(|v| (self.code.gpa() - v.size, v.size))
    }

    /// Put the variable store, if any, on the memory bus.
    pub fn attach_vars(&self, buses: &Buses) -> Result<(), BootRomError> {
        let (Some(vars), Some((gpa, size))) = (&self.vars, self.vars_range()) else {
            return Ok(());
        };
        // SAFETY: a shared mapping of the store file, as bhyve makes. The file is exclusively
        // locked (flock) while this VM runs, and its size was checked, so no cooperating
        // process truncates it under the mapping (which would fault) or writes it behind our
        // back; the mapping is only reached through the device's bounds-checked accesses.
        let mapping = unsafe { MmapOptions::new().len(size as usize).map_mut(&*vars.file) }
            .map_err(|e| BootRomError::MapVars {
                path: vars.path.clone(),
                reason: e.to_string(),
            })?;
        let device = Arc::new(Mutex::new(FlashVars {
            mapping,
            command: CFI_READ_ARRAY,
        }));
        buses.mmio.insert(gpa, size, device)?;
        Ok(())
    }
}

const CFI_WRITE_BYTE: u8 = 0x10;
const CFI_CLEAR_STATUS: u8 = 0x50;
const CFI_READ_STATUS: u8 = 0x70;
const CFI_READ_ARRAY: u8 = 0xff;

/// The variable store as a CFI flash: reads return the file (or a clear status after a status
/// command); a write is either a command byte or, after "write byte", data for the file.
struct FlashVars {
    mapping: MmapMut,
    command: u8,
}

impl crate::bus::BusDevice for FlashVars {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match self.command {
            CFI_CLEAR_STATUS | CFI_READ_STATUS => {
                data.fill(0);
                self.command = CFI_READ_ARRAY;
            }
            _ => {
                let start = offset as usize;
                match self.mapping.get(start..start + data.len()) {
                    Some(src) => data.copy_from_slice(src),
                    None => data.fill(0xff),
                }
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if self.command == CFI_WRITE_BYTE {
            let start = offset as usize;
            if let Some(dst) = self.mapping.get_mut(start..start + data.len()) {
                dst.copy_from_slice(data);
            }
            self.command = CFI_READ_ARRAY;
        } else if let Some(&command) = data.first() {
            self.command = command;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(tag: &str, bytes: &[u8]) -> Self {
            let path =
                std::env::temp_dir().join(format!("bhyve-rs-bootrom-{}-{tag}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            Self(path)
        }
        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn config(rom: &str, vars: Option<&str>) -> Config {
        let mut c = Config::new();
        c.set("lpc.bootrom", rom);
        if let Some(vars) = vars {
            c.set("lpc.bootvars", vars);
        }
        c
    }

    fn error(c: &Config) -> String {
        match BootRom::load(c) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_code_ends_at_4_gib_and_the_store_sits_below_it() {
        let mut image = vec![0u8; 8192];
        image[8192 - 16] = 0xea;
        let rom = TempFile::new("code", &image);
        let vars = TempFile::new("vars", &[0x5a; 4096]);
        let loaded = BootRom::load(&config(rom.path(), Some(vars.path())))
            .unwrap()
            .unwrap();
        assert_eq!(loaded.code().gpa(), FOUR_GIB - 8192);
        assert_eq!(loaded.code().as_slice()[8192 - 16], 0xea);
        assert_eq!(loaded.vars_range(), Some((FOUR_GIB - 8192 - 4096, 4096)));
        assert!(BootRom::load(&Config::new()).unwrap().is_none());
        // A second VM cannot take the same variable store while this one holds it.
        let second = error(&config(rom.path(), Some(vars.path())));
        assert!(second.contains("in use by another process"), "{second}");
        drop(loaded);
        assert!(BootRom::load(&config(rom.path(), Some(vars.path()))).is_ok());
    }

    #[test]
    fn sizes_and_files_are_checked_as_bhyve_does() {
        let missing = config("/nonexistent/rom.fd", None);
        assert_eq!(
            error(&missing),
            "Error opening bootrom \"/nonexistent/rom.fd\": No such file or directory"
        );
        let odd = TempFile::new("odd", &[0; 5000]);
        assert_eq!(
            error(&config(odd.path(), None)),
            "ROM size 5000 is not a multiple of the page size"
        );
        let empty = TempFile::new("empty", &[]);
        assert_eq!(error(&config(empty.path(), None)), "ROM size 0 is invalid");
        let big = TempFile::new("big", &vec![0; (BOOTROM_SIZE + PAGE_SIZE) as usize]);
        assert_eq!(
            error(&config(big.path(), None)),
            format!("ROM size {} is invalid", BOOTROM_SIZE + PAGE_SIZE)
        );
        let full = TempFile::new("full", &vec![0; BOOTROM_SIZE as usize]);
        let vars = TempFile::new("vars-ok", &[0; 4096]);
        assert_eq!(
            error(&config(full.path(), Some(vars.path()))),
            format!(
                "Invalid bootrom and variable aggregate size {}",
                BOOTROM_SIZE + 4096
            )
        );
        let page = TempFile::new("page", &[0; 4096]);
        let tiny = TempFile::new("tiny-vars", &[0; 100]);
        assert_eq!(
            error(&config(page.path(), Some(tiny.path()))),
            "Invalid bootrom variable size 100"
        );
    }

    #[test]
    fn the_store_speaks_enough_cfi_and_writes_reach_the_file() {
        let rom = TempFile::new("cfi-code", &[0; 4096]);
        let vars = TempFile::new("cfi-vars", &[0x11; 4096]);
        let loaded = BootRom::load(&config(rom.path(), Some(vars.path())))
            .unwrap()
            .unwrap();
        let buses = Buses::default();
        loaded.attach_vars(&buses).unwrap();
        let (gpa, _) = loaded.vars_range().unwrap();
        let mut byte = [0u8];
        assert!(buses.mmio.read(gpa + 8, &mut byte));
        assert_eq!(byte, [0x11]);
        // Read status answers 0 once, then the array again.
        assert!(buses.mmio.write(gpa, &[CFI_READ_STATUS]));
        assert!(buses.mmio.read(gpa + 8, &mut byte));
        assert_eq!(byte, [0]);
        assert!(buses.mmio.read(gpa + 8, &mut byte));
        assert_eq!(byte, [0x11]);
        // Write byte, then the data: it lands in the file.
        assert!(buses.mmio.write(gpa + 8, &[CFI_WRITE_BYTE]));
        assert!(buses.mmio.write(gpa + 8, &[0x77]));
        drop(buses);
        drop(loaded);
        assert_eq!(std::fs::read(&vars.0).unwrap()[8], 0x77);
    }
}
