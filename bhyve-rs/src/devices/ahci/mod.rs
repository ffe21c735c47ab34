//! AHCI as bhyve's `pci_ahci.c`: an Intel ICH8 SATA controller (8086:2821) with 32 ports, each
//! empty or holding a disk (`hd`) or an ATAPI CD-ROM (`cd`) on the shared block backend.
//!
//! The guest issues commands by setting bits of a port's PxCI; the device reads the command
//! header, the command FIS and the PRDT from guest memory (every address bounds-checked: a
//! structure outside RAM ends the command with an error status), runs data transfers on the
//! block backend's workers, and posts D2H or Set Device Bits FISes into the port's received-FIS
//! area, raising MSI (one message per port, as far as the guest enables) or INTx.
//!
//! One lock guards the controller: register accesses from vCPUs and completions from block
//! workers both take it. Requests are never started while paused, so before a snapshot every
//! command has completed and only registers and port state need saving.

pub mod ata;

use std::sync::{Arc, Mutex, MutexGuard};

use ata::*;

use crate::config::legacy::{LegacyError, LegacyWriter};
use crate::config::Config;
use crate::devices::block::{
    BlockBackend, BlockFile, BlockInfo, BlockOp, BlockOptions, BlockRequest, BlockResult,
    MAX_SEGMENTS,
};
use crate::devices::pci::irq::IntxLine;
use crate::devices::pci::{
    BarKind, ConfigSpace, PciAddress, PciDevice, PCIC_STORAGE, PCIR_CLASS, PCIR_DEVICE,
    PCIR_PROGIF, PCIR_SUBCLASS, PCIR_VENDOR, PCIS_STORAGE_SATA,
};
use crate::devices::registry::{CreatePci, PciCreate, PciEmulation, PciPlan};
use crate::devices::DeviceError;
use crate::interrupts::InterruptSink;
use crate::memory::{GuestMemory, Segment};

pub const EMULATION: PciEmulation = PciEmulation {
    name: "ahci",
    alias_of: None,
    legacy_config: legacy_ahci,
    plan: Some(plan),
};
pub const EMULATION_CD: PciEmulation = PciEmulation {
    name: "ahci-cd",
    alias_of: Some("ahci"),
    legacy_config: legacy_ahci_cd,
    plan: None,
};
pub const EMULATION_HD: PciEmulation = PciEmulation {
    name: "ahci-hd",
    alias_of: Some("ahci"),
    legacy_config: legacy_ahci_hd,
    plan: None,
};

/// Ports of a controller (`MAX_PORTS`); bhyve always exposes all of them.
pub const MAX_PORTS: usize = 32;
/// Command slots per port (`AHCI_MAX_SLOTS`).
pub const MAX_SLOTS: usize = 32;
/// The register BAR (ABAR).
pub const ABAR: usize = 5;
/// Start and stride of the port registers (`AHCI_OFFSET`, `AHCI_STEP`).
pub const PORT_OFFSET: u64 = 0x100;
pub const PORT_STEP: u64 = 0x80;
/// Bytes of one command header (`AHCI_CL_SIZE`).
pub const HEADER_SIZE: u64 = 32;
/// Command table: command FIS at 0, ATAPI command at 0x40, PRDT from 0x80.
pub const ACMD_OFFSET: usize = 0x40;
pub const PRDT_OFFSET: u64 = 0x80;
const PRDT_ENTRY: u64 = 16;
/// Byte count field of a PRDT entry (`DBCMASK`).
const DBC_MASK: u32 = 0x3f_ffff;

pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_ICH8_AHCI: u16 = 0x2821;
const PCIP_STORAGE_SATA_AHCI_1_0: u8 = 0x01;

pub const SIG_ATA: u32 = 0x0000_0101;
pub const SIG_ATAPI: u32 = 0xeb14_0101;

// FIS types.
pub const FIS_REG_H2D: u8 = 0x27;
pub const FIS_REG_D2H: u8 = 0x34;
pub const FIS_PIO_SETUP: u8 = 0x5f;
pub const FIS_SET_DEV_BITS: u8 = 0xa1;

// HBA registers.
pub const CAP: u64 = 0x00;
pub const GHC: u64 = 0x04;
pub const IS: u64 = 0x08;
pub const PI: u64 = 0x0c;
pub const VS: u64 = 0x10;
pub const CAP2: u64 = 0x24;
pub const BOHC: u64 = 0x28;

pub const CAP_64BIT: u32 = 1 << 31;
pub const CAP_SNCQ: u32 = 1 << 30;
pub const CAP_SSNTF: u32 = 1 << 29;
pub const CAP_SMPS: u32 = 1 << 28;
pub const CAP_SSS: u32 = 1 << 27;
pub const CAP_SALP: u32 = 1 << 26;
pub const CAP_SAL: u32 = 1 << 25;
pub const CAP_SCLO: u32 = 1 << 24;
pub const CAP_ISS_SHIFT: u32 = 20;
pub const CAP_PMD: u32 = 1 << 15;
pub const CAP_SSC: u32 = 1 << 14;
pub const CAP_PSC: u32 = 1 << 13;
pub const CAP_NCS_SHIFT: u32 = 8;
pub const CAP_SXS: u32 = 1 << 5;
pub const CAP2_APST: u32 = 1 << 2;

pub const GHC_AE: u32 = 1 << 31;
pub const GHC_IE: u32 = 1 << 1;
pub const GHC_HR: u32 = 1 << 0;

// Port registers.
pub const P_CLB: u64 = 0x00;
pub const P_CLBU: u64 = 0x04;
pub const P_FB: u64 = 0x08;
pub const P_FBU: u64 = 0x0c;
pub const P_IS: u64 = 0x10;
pub const P_IE: u64 = 0x14;
pub const P_CMD: u64 = 0x18;
pub const P_TFD: u64 = 0x20;
pub const P_SIG: u64 = 0x24;
pub const P_SSTS: u64 = 0x28;
pub const P_SCTL: u64 = 0x2c;
pub const P_SERR: u64 = 0x30;
pub const P_SACT: u64 = 0x34;
pub const P_CI: u64 = 0x38;
pub const P_SNTF: u64 = 0x3c;
pub const P_FBS: u64 = 0x40;

pub const P_CMD_ST: u32 = 1 << 0;
pub const P_CMD_SUD: u32 = 1 << 1;
pub const P_CMD_POD: u32 = 1 << 2;
pub const P_CMD_CLO: u32 = 1 << 3;
pub const P_CMD_FRE: u32 = 1 << 4;
pub const P_CMD_CCS_SHIFT: u32 = 8;
pub const P_CMD_CCS_MASK: u32 = 0x1f << 8;
pub const P_CMD_FR: u32 = 1 << 14;
pub const P_CMD_CR: u32 = 1 << 15;
pub const P_CMD_CPS: u32 = 1 << 16;
pub const P_CMD_APSTE: u32 = 1 << 23;
pub const P_CMD_ATAPI: u32 = 1 << 24;
pub const P_CMD_DLAE: u32 = 1 << 25;
pub const P_CMD_ALPE: u32 = 1 << 26;
pub const P_CMD_ASP: u32 = 1 << 27;
pub const P_CMD_ICC_MASK: u32 = 0xf << 28;
/// PxCMD bits the guest writes.
const P_CMD_WRITABLE: u32 = P_CMD_ST
    | P_CMD_SUD
    | P_CMD_POD
    | P_CMD_CLO
    | P_CMD_FRE
    | P_CMD_APSTE
    | P_CMD_ATAPI
    | P_CMD_DLAE
    | P_CMD_ALPE
    | P_CMD_ASP
    | P_CMD_ICC_MASK;

pub const P_IX_DHR: u32 = 1 << 0;
pub const P_IX_PS: u32 = 1 << 1;
pub const P_IX_SDB: u32 = 1 << 3;
pub const P_IX_TFE: u32 = 1 << 30;
/// PxIE bits that exist.
const P_IE_MASK: u32 = 0xfdc0_00ff;

// ---------------------------------------------------------------------------------------------
// Configuration

fn legacy_port(
    w: &mut LegacyWriter<'_>,
    ports: &str,
    port: usize,
    kind: &str,
    conf: Option<&str>,
) -> Result<(), LegacyError> {
    let port_node = format!("{ports}.{port}");
    w.create(&port_node)?;
    w.set(&port_node, "type", kind)?;
    crate::devices::block::legacy_config(w, &port_node, conf)
}

/// `ahci-cd`: one CD port, block syntax.
fn legacy_ahci_cd(
    w: &mut LegacyWriter<'_>,
    node: &str,
    conf: Option<&str>,
) -> Result<(), LegacyError> {
    let ports = format!("{node}.port");
    w.create(&ports)?;
    legacy_port(w, &ports, 0, "cd", conf)
}

/// `ahci-hd`: one disk port, block syntax.
fn legacy_ahci_hd(
    w: &mut LegacyWriter<'_>,
    node: &str,
    conf: Option<&str>,
) -> Result<(), LegacyError> {
    let ports = format!("{node}.port");
    w.create(&ports)?;
    legacy_port(w, &ports, 0, "hd", conf)
}

/// `hd:PATH[,opts],cd:PATH[,opts]…`, one port each.
fn legacy_ahci(
    w: &mut LegacyWriter<'_>,
    node: &str,
    conf: Option<&str>,
) -> Result<(), LegacyError> {
    let Some(conf) = conf else {
        return Ok(());
    };
    let ports = format!("{node}.port");
    w.create(&ports)?;
    let mut rest = Some(conf);
    let mut port = 0;
    while port < MAX_PORTS {
        let Some(mut s) = rest else {
            break;
        };
        let kind = if let Some(p) = s.strip_prefix("hd:") {
            s = p;
            Some("hd")
        } else if let Some(p) = s.strip_prefix("cd:") {
            s = p;
            Some("cd")
        } else {
            None
        };
        // The port's options end where the next ",hd:" or ",cd:" begins.
        let next = [s.find(",hd:"), s.find(",cd:")].into_iter().flatten().min();
        let current = match next {
            Some(i) => {
                rest = Some(&s[i + 1..]);
                &s[..i]
            }
            None => {
                rest = None;
                s
            }
        };
        if !current.is_empty() {
            let Some(kind) = kind else {
                return Err(LegacyError::Invalid(format!(
                    "Missing or invalid type for port {port}: \"{current}\""
                )));
            };
            legacy_port(w, &ports, port, kind, Some(current))?;
        }
        port += 1;
    }
    Ok(())
}

/// A configured port, its disk opened.
struct PortPlan {
    index: usize,
    atapi: bool,
    file: BlockFile,
    serial: String,
    revision: String,
    model: String,
    rotation_rate: u16,
}

/// `atoi`: leading digits, 0 when there are none.
fn atoi(value: &str) -> u16 {
    let t = value.trim_start();
    let (sign, digits) = match t.strip_prefix('-') {
        Some(d) => (-1i64, d),
        None => (1, t.strip_prefix('+').unwrap_or(t)),
    };
    let n: i64 = digits
        .chars()
        .take_while(char::is_ascii_digit)
        .fold(0i64, |a, c| {
            a.saturating_mul(10)
                .saturating_add(i64::from(c as u8 - b'0'))
        });
    (sign * n) as u16
}

/// Read the ports below the slot's node and open their disks.
fn plan_ports(config: &Config, node: &str, slot: PciAddress) -> Result<Vec<PortPlan>, DeviceError> {
    let mut ports = Vec::new();
    for index in 0..MAX_PORTS {
        let port_node = format!("{node}.port.{index}");
        let Some(kind) = config.get(&format!("{port_node}.type")) else {
            continue;
        };
        let atapi = kind != "hd";
        let mut options = BlockOptions::from_config(config, &port_node)?;
        // ATAPI has no write command: a CD never needs write access to its image.
        if atapi {
            options.readonly = true;
        }
        let get = |key: &str| config.get(&format!("{port_node}.{key}"));
        let derived = crate::devices::block::serial_from_path(&options.path);
        let file =
            BlockFile::open(&options).map_err(|source| DeviceError::Block { slot, source })?;
        ports.push(PortPlan {
            index,
            atapi,
            file,
            serial: get("ser").map_or(derived, str::to_string),
            revision: get("rev").unwrap_or("001").to_string(),
            model: get("model")
                .unwrap_or(if atapi {
                    "BHYVE SATA DVD ROM"
                } else {
                    "BHYVE SATA DISK"
                })
                .to_string(),
            rotation_rate: get("nmrr").map_or(0, atoi),
        });
    }
    Ok(ports)
}

fn plan(plan: &mut PciPlan<'_>, slot: PciAddress) -> Result<CreatePci, DeviceError> {
    let node = slot.config_node();
    let ports = plan_ports(plan.config, &node, slot)?;
    Ok(Box::new(move |create| {
        let mut backends = Vec::new();
        for p in ports {
            let name = format!("{}:{}:{}", slot.slot, slot.function, p.index);
            let backend =
                BlockBackend::start(p.file, create.memory.clone(), &name).map_err(|e| {
                    DeviceError::Platform(format!("{node}: cannot start disk workers: {e}"))
                })?;
            backends.push(AttachedPort {
                index: p.index,
                atapi: p.atapi,
                backend,
                serial: p.serial,
                revision: p.revision,
                model: p.model,
                rotation_rate: p.rotation_rate,
            });
        }
        Ok(Box::new(Ahci::new(backends, create)?) as Box<dyn PciDevice>)
    }))
}

// ---------------------------------------------------------------------------------------------
// The controller

/// A port with a disk, ready to be attached.
pub struct AttachedPort {
    pub index: usize,
    pub atapi: bool,
    pub backend: BlockBackend,
    pub serial: String,
    pub revision: String,
    pub model: String,
    pub rotation_rate: u16,
}

/// One port's registers and command state (`struct ahci_port`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortState {
    pub clb: u32,
    pub clbu: u32,
    pub fb: u32,
    pub fbu: u32,
    pub is: u32,
    pub ie: u32,
    pub cmd: u32,
    pub tfd: u32,
    pub sig: u32,
    pub ssts: u32,
    pub sctl: u32,
    pub serr: u32,
    pub sact: u32,
    pub ci: u32,
    pub sntf: u32,
    pub fbs: u32,
    pub atapi: bool,
    /// A software reset is under way (SRST set in a control FIS).
    pub reset: bool,
    /// An error was posted: no new command until the guest clears it.
    pub waitforclear: bool,
    pub mult_sectors: u8,
    pub xfermode: u8,
    /// The NCQ command error log page.
    pub err_cfis: Vec<u8>,
    pub sense_key: u8,
    pub asc: u8,
    /// Current command slot.
    pub ccs: u32,
    /// Slots with a request on the backend.
    pub pending: u32,
}

/// The controller's registers (`struct pci_ahci_softc`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HbaState {
    pub cap: u32,
    pub ghc: u32,
    pub is: u32,
    pub pi: u32,
    pub vs: u32,
    pub cap2: u32,
    pub bohc: u32,
    /// INTx is asserted.
    pub lintr: bool,
    pub ports: Vec<PortState>,
}

/// A command as read from guest memory: its slot, command FIS (with the ATAPI command) and
/// PRDT as (address, byte count) pairs.
#[derive(Clone)]
struct Command {
    slot: usize,
    cfis: [u8; PRDT_OFFSET as usize],
    prdt: Vec<(u64, u64)>,
}

/// A transfer on the backend: the part under way is `done..` up to `len`.
struct Transfer {
    command: Command,
    offset: u64,
    len: u64,
    done: u64,
}

/// What a request on the backend is.
enum InFlight {
    /// READ/WRITE (DMA, PIO, NCQ) and ATAPI READ: `next_done` bytes done once it completes.
    Data {
        transfer: Transfer,
        write: bool,
        next_done: u64,
    },
    Flush(Command),
    /// One TRIM range; the ranges continue at byte `next` of the range list.
    Trim {
        command: Command,
        ranges: Vec<u8>,
        next: usize,
    },
}

struct Drive {
    backend: Arc<BlockBackend>,
    info: BlockInfo,
    identify: [u16; IDENTIFY_WORDS],
}

/// Everything the vCPUs and the block workers share.
struct Shared {
    state: Mutex<HbaState>,
    memory: Arc<GuestMemory>,
    drives: Vec<Option<Drive>>,
    intx: Arc<IntxLine>,
    sink: Arc<dyn InterruptSink>,
    /// MSI as the guest programmed it: address, data, messages enabled.
    msi: Mutex<Option<(u64, u32, u32)>>,
}

fn is_ncq(command: u8) -> bool {
    matches!(
        command,
        READ_FPDMA_QUEUED | WRITE_FPDMA_QUEUED | SEND_FPDMA_QUEUED
    )
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HbaState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn msi(&self) -> Option<(u64, u32, u32)> {
        *self.msi.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send_msi(&self, vector: u32) {
        if let Some((address, data, _)) = self.msi() {
            if let Err(e) = self.sink.signal_msi(address, data.wrapping_add(vector)) {
                log::warn!("ahci: cannot send MSI: {e}");
            }
        }
    }

    fn messages(&self) -> usize {
        self.msi().map_or(0, |(_, _, n)| n as usize)
    }

    /// `ahci_generate_intr`: after a write of GHC or IS.
    fn generate_intr(&self, s: &mut HbaState, mask: u32) {
        for (i, p) in s.ports.iter().enumerate() {
            if p.is & p.ie != 0 {
                s.is |= 1 << i;
            }
        }
        if s.is == 0 || s.ghc & GHC_IE == 0 {
            if s.lintr {
                self.intx.deassert();
                s.lintr = false;
            }
            return;
        }
        let nmsg = self.messages();
        if nmsg == 0 {
            if !s.lintr {
                s.lintr = true;
                self.intx.assert();
            }
            return;
        }
        for i in 0..nmsg {
            let mmask = if s.ports.len() <= nmsg || i < nmsg - 1 {
                1u32 << i
            } else {
                u32::MAX << i
            };
            if s.is & mask != 0 && mmask & mask != 0 {
                self.send_msi(i as u32);
            }
        }
    }

    /// `ahci_port_intr`: after an event on port `port`.
    fn port_intr(&self, s: &mut HbaState, port: usize) {
        let p = &s.ports[port];
        if p.is & p.ie == 0 {
            return;
        }
        let nmsg = self.messages();
        if s.ports.len() <= nmsg || port + 1 < nmsg {
            s.is |= 1 << port;
            if s.ghc & GHC_IE != 0 {
                self.send_msi(port as u32);
            }
            return;
        }
        if s.is & (1 << port) != 0 {
            return;
        }
        s.is |= 1 << port;
        if s.ghc & GHC_IE == 0 {
            return;
        }
        if nmsg > 0 {
            self.send_msi(nmsg as u32 - 1);
        } else if !s.lintr {
            s.lintr = true;
            self.intx.assert();
        }
    }

    /// Copy a FIS into the port's received-FIS area and raise what it asks for.
    fn write_fis(&self, s: &mut HbaState, port: usize, fis: &[u8]) {
        let p = &mut s.ports[port];
        // An error holds the command list even when no FIS is received: otherwise the failed
        // command, still issued, would be picked up again at once, forever.
        if u32::from(fis[2]) & S_ERROR != 0 {
            p.waitforclear = true;
        }
        if p.cmd & P_CMD_FRE == 0 {
            return;
        }
        let interrupt = fis[1] & (1 << 6) != 0;
        let (offset, irq) = match fis[0] {
            FIS_REG_D2H => (0x40, if interrupt { P_IX_DHR } else { 0 }),
            FIS_SET_DEV_BITS => (0x58, if interrupt { P_IX_SDB } else { 0 }),
            FIS_PIO_SETUP => (0x20, if interrupt { P_IX_PS } else { 0 }),
            _ => return,
        };
        let mut irq = irq;
        if u32::from(fis[2]) & S_ERROR != 0 {
            p.waitforclear = true;
            irq |= P_IX_TFE;
        }
        let fb = (u64::from(p.fbu) << 32) | u64::from(p.fb);
        let written = fb
            .checked_add(offset)
            .is_some_and(|at| self.memory.write(at, fis).is_ok());
        if !written {
            log::debug!("ahci: port {port}: received-FIS area {fb:#x} outside guest memory");
        }
        if irq != 0 && !p.is & irq != 0 {
            p.is |= irq;
            self.port_intr(s, port);
        }
    }

    fn write_fis_piosetup(&self, s: &mut HbaState, port: usize) {
        let mut fis = [0u8; 20];
        fis[0] = FIS_PIO_SETUP;
        self.write_fis(s, port, &fis);
    }

    fn write_fis_sdb(&self, s: &mut HbaState, port: usize, c: &Command, tfd: u32) {
        let error = (tfd >> 8) as u8;
        let tfd = tfd & 0x77;
        let mut fis = [0u8; 8];
        fis[0] = FIS_SET_DEV_BITS;
        fis[1] = 1 << 6;
        fis[2] = tfd as u8;
        fis[3] = error;
        let p = &mut s.ports[port];
        if tfd & S_ERROR != 0 {
            p.err_cfis[0] = c.slot as u8;
            p.err_cfis[2] = tfd as u8;
            p.err_cfis[3] = error;
            p.err_cfis[4..20].copy_from_slice(&c.cfis[4..20]);
        } else {
            fis[4..8].copy_from_slice(&(1u32 << c.slot).to_le_bytes());
            p.sact &= !(1 << c.slot);
        }
        p.tfd = (p.tfd & !0x77) | tfd;
        self.write_fis(s, port, &fis);
    }

    fn write_fis_d2h(&self, s: &mut HbaState, port: usize, c: &Command, tfd: u32) {
        let error = (tfd >> 8) as u8;
        let mut fis = [0u8; 20];
        fis[0] = FIS_REG_D2H;
        fis[1] = 1 << 6;
        fis[2] = tfd as u8;
        fis[3] = error;
        fis[4..14].copy_from_slice(&c.cfis[4..14]);
        let p = &mut s.ports[port];
        if u32::from(fis[2]) & S_ERROR != 0 {
            p.err_cfis[0] = 0x80;
            p.err_cfis[2] = tfd as u8;
            p.err_cfis[3] = error;
            p.err_cfis[4..20].copy_from_slice(&c.cfis[4..20]);
        } else {
            p.ci &= !(1 << c.slot);
        }
        p.tfd = tfd;
        self.write_fis(s, port, &fis);
    }

    fn write_fis_d2h_ncq(&self, s: &mut HbaState, port: usize, slot: usize) {
        let p = &mut s.ports[port];
        p.tfd = S_READY | S_DSC;
        let mut fis = [0u8; 20];
        fis[0] = FIS_REG_D2H;
        fis[2] = p.tfd as u8;
        p.ci &= !(1 << slot);
        self.write_fis(s, port, &fis);
    }

    fn write_reset_fis_d2h(&self, s: &mut HbaState, port: usize) {
        let mut fis = [0u8; 20];
        fis[0] = FIS_REG_D2H;
        fis[3] = 1;
        fis[4] = 1;
        if s.ports[port].atapi {
            fis[5] = 0x14;
            fis[6] = 0xeb;
        }
        fis[12] = 1;
        self.write_fis(s, port, &fis);
    }

    /// `ahci_check_stopped`: once stopped and idle, the command state clears.
    fn check_stopped(s: &mut HbaState, port: usize) {
        let p = &mut s.ports[port];
        if p.cmd & P_CMD_ST == 0 && p.pending == 0 {
            p.ccs = 0;
            p.cmd &= !(P_CMD_CR | P_CMD_CCS_MASK);
            p.ci = 0;
            p.sact = 0;
            p.waitforclear = false;
        }
    }

    fn port_reset(&self, s: &mut HbaState, port: usize) {
        let present = self.drives[port].is_some();
        let p = &mut s.ports[port];
        p.serr = 0;
        p.sact = 0;
        p.xfermode = UDMA6;
        p.mult_sectors = 128;
        if !present {
            p.ssts = 0;
            p.sig = 0xffff_ffff;
            p.tfd = 0x7f;
            return;
        }
        p.ssts = SS_DET_PHY_ONLINE | SS_IPM_ACTIVE;
        p.ssts |= if p.sctl & SC_SPD_MASK != 0 {
            p.sctl & SC_SPD_MASK
        } else {
            SS_SPD_GEN3
        };
        p.tfd = (1 << 8) | S_DSC | S_DMA;
        if p.atapi {
            p.sig = SIG_ATAPI;
        } else {
            p.sig = SIG_ATA;
            p.tfd |= S_READY;
        }
        self.write_reset_fis_d2h(s, port);
    }

    fn reset(&self, s: &mut HbaState) {
        s.ghc = GHC_AE;
        s.is = 0;
        if s.lintr {
            self.intx.deassert();
            s.lintr = false;
        }
        for i in 0..s.ports.len() {
            let p = &mut s.ports[i];
            p.ie = 0;
            p.is = 0;
            p.cmd = P_CMD_SUD | P_CMD_POD;
            if self.drives[i].is_some() {
                p.cmd |= P_CMD_CPS;
            }
            p.sctl = 0;
            self.port_reset(s, i);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Commands

    /// `ahci_handle_port`: start every issued command not yet started, unless the device is busy
    /// or waiting for an error to be cleared.
    fn handle_port(self: &Arc<Self>, s: &mut HbaState, port: usize) {
        if s.ports[port].cmd & P_CMD_ST == 0 {
            return;
        }
        loop {
            let p = &s.ports[port];
            if p.ci & !p.pending == 0 || p.tfd & (S_BUSY | S_DRQ) != 0 || p.waitforclear {
                break;
            }
            let ccs = p.ccs;
            if p.ci & !p.pending & (1 << ccs) != 0 {
                let p = &mut s.ports[port];
                p.cmd = (p.cmd & !P_CMD_CCS_MASK) | (ccs << P_CMD_CCS_SHIFT);
                self.handle_slot(s, port, ccs as usize);
            }
            let p = &mut s.ports[port];
            p.ccs = (p.ccs + 1) & 31;
        }
    }

    /// Address of the command header of `slot`.
    fn header_address(s: &HbaState, port: usize, slot: usize) -> Option<u64> {
        let p = &s.ports[port];
        ((u64::from(p.clbu) << 32) | u64::from(p.clb)).checked_add(slot as u64 * HEADER_SIZE)
    }

    /// Read the command of `slot` from guest memory.
    fn read_command(&self, s: &HbaState, port: usize, slot: usize) -> Option<Command> {
        let at = Self::header_address(s, port, slot)?;
        let mut header = [0u8; HEADER_SIZE as usize];
        self.memory.read(at, &mut header).ok()?;
        let prdtl = u64::from(u16::from_le_bytes([header[2], header[3]]));
        let ctba = u64::from_le_bytes(header[8..16].try_into().ok()?);
        let mut cfis = [0u8; PRDT_OFFSET as usize];
        self.memory.read(ctba, &mut cfis).ok()?;
        let mut table = vec![0u8; (prdtl * PRDT_ENTRY) as usize];
        self.memory
            .read(ctba.checked_add(PRDT_OFFSET)?, &mut table)
            .ok()?;
        let prdt = table
            .chunks_exact(PRDT_ENTRY as usize)
            .map(|e| {
                let dba = u64::from_le_bytes(e[0..8].try_into().unwrap_or_default());
                let dbc = u32::from_le_bytes(e[12..16].try_into().unwrap_or_default());
                (dba, u64::from(dbc & DBC_MASK) + 1)
            })
            .collect();
        Some(Command { slot, cfis, prdt })
    }

    /// The command header's PRD byte count.
    fn set_prdbc(&self, s: &HbaState, port: usize, slot: usize, count: u64) {
        if let Some(at) = Self::header_address(s, port, slot).and_then(|a| a.checked_add(4)) {
            let _ = self.memory.write(at, &(count as u32).to_le_bytes());
        }
    }

    fn handle_slot(self: &Arc<Self>, s: &mut HbaState, port: usize, slot: usize) {
        let Some(command) = self.read_command(s, port, slot) else {
            // A header, command table or PRDT outside guest memory: refuse the command.
            log::debug!("ahci: port {port}: slot {slot}: command outside guest memory");
            let c = Command {
                slot,
                cfis: [0; PRDT_OFFSET as usize],
                prdt: Vec::new(),
            };
            self.write_fis_d2h(s, port, &c, ABORTED);
            return;
        };
        if self.drives[port].is_none() {
            // Only a guest that overrode the port's busy status gets here.
            self.write_fis_d2h(s, port, &command, ABORTED);
            return;
        }
        if command.cfis[0] != FIS_REG_H2D {
            log::debug!("ahci: port {port}: not a H2D FIS: {:#x}", command.cfis[0]);
            self.write_fis_d2h(s, port, &command, ABORTED);
            return;
        }
        if command.cfis[1] & 0x80 != 0 {
            s.ports[port].tfd |= S_BUSY;
            self.handle_command(s, port, command);
        } else {
            // A control FIS: SRST set then cleared resets the port.
            let p = &mut s.ports[port];
            if command.cfis[15] & (1 << 2) != 0 {
                p.reset = true;
            } else if p.reset {
                p.reset = false;
                self.port_reset(s, port);
            }
            s.ports[port].ci &= !(1 << slot);
        }
    }

    fn handle_command(self: &Arc<Self>, s: &mut HbaState, port: usize, mut c: Command) {
        let atapi = s.ports[port].atapi;
        let cfis = c.cfis;
        match cfis[2] {
            ATA_IDENTIFY | ATAPI_IDENTIFY => {
                if atapi != (cfis[2] == ATAPI_IDENTIFY) || c.prdt.is_empty() {
                    self.write_fis_d2h(s, port, &c, ABORTED);
                } else {
                    let ident = self.identify(port);
                    self.write_fis_piosetup(s, port);
                    self.reply(s, port, &c, &ident, OK);
                }
            }
            SETFEATURES => {
                let tfd = match cfis[3] {
                    SF_ENAB_SATA_SF if cfis[12] == SATA_SF_AN => OK,
                    SF_ENAB_WCACHE | SF_DIS_WCACHE | SF_ENAB_RCACHE | SF_DIS_RCACHE => OK,
                    SF_SETXFER => {
                        if matches!(cfis[12] & 0xf8, WDMA0 | UDMA0) {
                            s.ports[port].xfermode = cfis[12] & 7;
                        }
                        OK
                    }
                    _ => ABORTED,
                };
                self.write_fis_d2h(s, port, &c, tfd);
            }
            SET_MULTI => {
                let n = cfis[12];
                let tfd = if n != 0 && (n > 128 || !n.is_power_of_two()) {
                    ABORTED
                } else {
                    s.ports[port].mult_sectors = n;
                    OK
                };
                self.write_fis_d2h(s, port, &c, tfd);
            }
            READ | WRITE | READ48 | WRITE48 | READ_MUL | WRITE_MUL | READ_MUL48 | WRITE_MUL48
            | READ_DMA | WRITE_DMA | READ_DMA48 | WRITE_DMA48 | READ_FPDMA_QUEUED
            | WRITE_FPDMA_QUEUED => self.start_rw(s, port, c),
            FLUSHCACHE | FLUSHCACHE48 => {
                s.ports[port].pending |= 1 << c.slot;
                self.submit(port, BlockOp::Flush, InFlight::Flush(c));
            }
            DATA_SET_MANAGEMENT
                if cfis[11] == 0 && cfis[3] == DSM_TRIM && cfis[13] == 0 && cfis[12] == 1 =>
            {
                self.start_trim(s, port, c)
            }
            SEND_FPDMA_QUEUED
                if cfis[13] & 0x1f == SFPDMA_DSM
                    && cfis[17] == 0
                    && cfis[16] == DSM_TRIM
                    && cfis[11] == 0
                    && cfis[3] == 1 =>
            {
                self.start_trim(s, port, c)
            }
            READ_LOG_EXT | READ_LOG_DMA_EXT => self.read_log(s, port, &c),
            CHECK_POWER_MODE => {
                c.cfis[12] = 0xff; // always on
                self.write_fis_d2h(s, port, &c, OK);
            }
            STANDBY_CMD | STANDBY_IMMEDIATE | IDLE_CMD | IDLE_IMMEDIATE | SLEEP | READ_VERIFY
            | READ_VERIFY48 => self.write_fis_d2h(s, port, &c, OK),
            PACKET_CMD if atapi => self.packet(s, port, c),
            SECURITY_FREEZE_LOCK | SMART_CMD | NOP | PACKET_CMD => {
                self.write_fis_d2h(s, port, &c, ABORTED)
            }
            other => {
                log::debug!("ahci: port {port}: unsupported command {other:#x}");
                self.write_fis_d2h(s, port, &c, ABORTED);
            }
        }
    }

    fn identify(&self, port: usize) -> Vec<u8> {
        self.drives[port]
            .as_ref()
            .map_or_else(|| vec![0; 512], |d| words_to_bytes(&d.identify).to_vec())
    }

    /// `write_prdt`: copy `data` into the command's buffers, set the byte count and end the
    /// command with `tfd`; a buffer outside guest memory ends it with an error instead.
    fn reply(&self, s: &mut HbaState, port: usize, c: &Command, data: &[u8], tfd: u32) {
        let mut left = data;
        for &(dba, dbc) in &c.prdt {
            if left.is_empty() {
                break;
            }
            let n = left.len().min(dbc as usize);
            if self.memory.write(dba, &left[..n]).is_err() {
                self.fail(s, port, c);
                return;
            }
            left = &left[n..];
        }
        self.set_prdbc(s, port, c.slot, (data.len() - left.len()) as u64);
        self.write_fis_d2h(s, port, c, tfd);
    }

    /// End a command whose guest structures are unusable: ATA abort, or for ATAPI an illegal
    /// request sense.
    fn fail(&self, s: &mut HbaState, port: usize, c: &Command) {
        if s.ports[port].atapi && c.cfis[2] == PACKET_CMD {
            self.atapi_error(s, port, c, 0x21);
        } else {
            self.write_fis_d2h(s, port, c, ABORTED);
        }
    }

    /// The guest buffers for bytes `done..len` of a transfer, at most [`MAX_SEGMENTS`] of
    /// them, rounded down to whole sectors when that limit cuts the transfer short
    /// (`ahci_build_iov`). `None` when a buffer lies outside guest memory.
    fn segments(&self, t: &Transfer, sector: u64) -> Option<Vec<Segment>> {
        let mut skip = t.done;
        let mut left = t.len - t.done;
        let mut segments = Vec::new();
        for &(dba, dbc) in &t.command.prdt {
            if left == 0 || segments.len() == MAX_SEGMENTS {
                break;
            }
            if dbc <= skip {
                skip -= dbc;
                continue;
            }
            let n = (dbc - skip).min(left);
            let addr = dba.checked_add(skip)?;
            self.memory.host_address(addr, n).ok()?;
            segments.push(Segment { addr, len: n });
            left -= n;
            skip = 0;
        }
        if segments.len() == MAX_SEGMENTS {
            let total: u64 = segments.iter().map(|s| s.len).sum();
            let mut extra = total % sector;
            while extra > 0 {
                let last = segments.last_mut()?;
                if last.len > extra {
                    last.len -= extra;
                    break;
                }
                extra -= last.len;
                segments.pop();
            }
        }
        Some(segments)
    }

    fn start_rw(self: &Arc<Self>, s: &mut HbaState, port: usize, c: Command) {
        let Some(drive) = &self.drives[port] else {
            return;
        };
        let cfis = &c.cfis;
        let command = cfis[2];
        let write = matches!(
            command,
            WRITE
                | WRITE48
                | WRITE_MUL
                | WRITE_MUL48
                | WRITE_DMA
                | WRITE_DMA48
                | WRITE_FPDMA_QUEUED
        );
        let lba48 = u64::from(cfis[4])
            | (u64::from(cfis[5]) << 8)
            | (u64::from(cfis[6]) << 16)
            | (u64::from(cfis[8]) << 24)
            | (u64::from(cfis[9]) << 32)
            | (u64::from(cfis[10]) << 40);
        let (lba, count) = if is_ncq(command) {
            let n = (u64::from(cfis[11]) << 8) | u64::from(cfis[3]);
            (lba48, if n == 0 { 65536 } else { n })
        } else if matches!(
            command,
            READ48 | WRITE48 | READ_MUL48 | WRITE_MUL48 | READ_DMA48 | WRITE_DMA48
        ) {
            let n = (u64::from(cfis[13]) << 8) | u64::from(cfis[12]);
            (lba48, if n == 0 { 65536 } else { n })
        } else {
            let lba = (u64::from(cfis[7] & 0xf) << 24)
                | (u64::from(cfis[6]) << 16)
                | (u64::from(cfis[5]) << 8)
                | u64::from(cfis[4]);
            let n = u64::from(cfis[12]);
            (lba, if n == 0 { 256 } else { n })
        };
        let sector = u64::from(drive.info.sector_size.max(1));
        if c.prdt.is_empty() {
            // Nowhere to move the data.
            self.write_fis_d2h(s, port, &c, ABORTED);
            return;
        }
        let transfer = Transfer {
            command: c,
            offset: lba * sector,
            len: count * sector,
            done: 0,
        };
        if is_ncq(command) {
            self.write_fis_d2h_ncq(s, port, transfer.command.slot);
        }
        self.continue_transfer(s, port, transfer, write, sector);
    }

    /// Submit the next part of a transfer.
    fn continue_transfer(
        self: &Arc<Self>,
        s: &mut HbaState,
        port: usize,
        transfer: Transfer,
        write: bool,
        sector: u64,
    ) {
        let Some(segments) = self.segments(&transfer, sector).filter(|v| !v.is_empty()) else {
            log::debug!("ahci: port {port}: PRDT outside guest memory or empty");
            let c = transfer.command;
            if is_ncq(c.cfis[2]) {
                self.write_fis_sdb(s, port, &c, ABORTED);
            } else {
                self.fail(s, port, &c);
            }
            s.ports[port].pending &= !(1 << c.slot);
            Self::check_stopped(s, port);
            return;
        };
        let bytes: u64 = segments.iter().map(|s| s.len).sum();
        let offset = transfer.offset + transfer.done;
        let op = if write {
            BlockOp::Write { offset, segments }
        } else {
            BlockOp::Read { offset, segments }
        };
        s.ports[port].pending |= 1 << transfer.command.slot;
        let next_done = transfer.done + bytes;
        self.submit(
            port,
            op,
            InFlight::Data {
                transfer,
                write,
                next_done,
            },
        );
    }

    fn submit(self: &Arc<Self>, port: usize, op: BlockOp, what: InFlight) {
        let Some(drive) = &self.drives[port] else {
            return;
        };
        let shared = self.clone();
        drive.backend.submit(BlockRequest {
            op,
            done: Box::new(move |result| shared.complete(port, what, result)),
        });
    }

    /// A backend request ended: go on with the command or finish it (`ata_ioreq_cb`,
    /// `atapi_ioreq_cb`).
    fn complete(self: &Arc<Self>, port: usize, what: InFlight, result: BlockResult) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let atapi = s.ports[port].atapi;
        let sector = self.drives[port]
            .as_ref()
            .map_or(512, |d| u64::from(d.info.sector_size.max(1)));
        match what {
            InFlight::Data {
                mut transfer,
                write,
                next_done,
            } => {
                let slot = transfer.command.slot;
                if result.is_ok() {
                    self.set_prdbc(s, port, slot, next_done);
                    let more = next_done < transfer.len
                        && self.segments_left(&transfer.command, next_done);
                    if more {
                        transfer.done = next_done;
                        let unit = if atapi { CD_SECTOR } else { sector };
                        self.continue_transfer(s, port, transfer, write, unit);
                        return;
                    }
                }
                let c = transfer.command;
                if atapi {
                    match result {
                        Ok(()) => {
                            let mut c = c;
                            c.cfis[4] = (c.cfis[4] & !7) | I_CMD | I_IN;
                            self.write_fis_d2h(s, port, &c, OK);
                        }
                        Err(_) => self.atapi_error(s, port, &c, 0x21),
                    }
                } else {
                    let tfd = if result.is_ok() { OK } else { ABORTED };
                    if is_ncq(c.cfis[2]) {
                        self.write_fis_sdb(s, port, &c, tfd);
                    } else {
                        self.write_fis_d2h(s, port, &c, tfd);
                    }
                }
                s.ports[port].pending &= !(1 << slot);
            }
            InFlight::Flush(c) => {
                let tfd = if result.is_ok() { OK } else { ABORTED };
                self.write_fis_d2h(s, port, &c, tfd);
                s.ports[port].pending &= !(1 << c.slot);
            }
            InFlight::Trim {
                command,
                ranges,
                next,
            } => {
                if result.is_ok() {
                    self.trim_ranges(s, port, command, ranges, next, false);
                    return;
                }
                let slot = command.slot;
                if is_ncq(command.cfis[2]) {
                    self.write_fis_sdb(s, port, &command, ABORTED);
                } else {
                    self.write_fis_d2h(s, port, &command, ABORTED);
                }
                s.ports[port].pending &= !(1 << slot);
            }
        }
        Self::check_stopped(s, port);
        self.handle_port(s, port);
    }

    /// Whether the PRDT has entries beyond byte `done` (`aior->more`).
    fn segments_left(&self, c: &Command, done: u64) -> bool {
        c.prdt.iter().map(|&(_, n)| n).sum::<u64>() > done
    }

    /// DATA SET MANAGEMENT (TRIM) or its NCQ form: read the 512-byte range list and delete
    /// each range in turn.
    fn start_trim(self: &Arc<Self>, s: &mut HbaState, port: usize, c: Command) {
        let mut ranges = vec![0u8; 512];
        let mut at = 0;
        for &(dba, dbc) in &c.prdt {
            if at == ranges.len() {
                break;
            }
            let n = (ranges.len() - at).min(dbc as usize);
            if self.memory.read(dba, &mut ranges[at..at + n]).is_err() {
                self.write_fis_d2h(s, port, &c, ABORTED);
                return;
            }
            at += n;
        }
        if c.prdt.is_empty() {
            self.write_fis_d2h(s, port, &c, ABORTED);
            return;
        }
        self.trim_ranges(s, port, c, ranges, 0, true);
    }

    /// Delete the next nonempty range from byte `next` of the list, or finish the command.
    fn trim_ranges(
        self: &Arc<Self>,
        s: &mut HbaState,
        port: usize,
        c: Command,
        ranges: Vec<u8>,
        mut next: usize,
        first: bool,
    ) {
        let ncq = is_ncq(c.cfis[2]);
        let sector = self.drives[port]
            .as_ref()
            .map_or(512, |d| u64::from(d.info.sector_size.max(1)));
        while next + 8 <= ranges.len() {
            let e = &ranges[next..next + 8];
            next += 8;
            let lba = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], 0, 0]);
            let count = u64::from(u16::from_le_bytes([e[6], e[7]]));
            if count == 0 {
                continue;
            }
            if ncq && first && s.ports[port].pending & (1 << c.slot) == 0 {
                self.write_fis_d2h_ncq(s, port, c.slot);
            }
            s.ports[port].pending |= 1 << c.slot;
            self.submit(
                port,
                BlockOp::Delete {
                    offset: lba * sector,
                    len: count * sector,
                },
                InFlight::Trim {
                    command: c,
                    ranges,
                    next,
                },
            );
            return;
        }
        if ncq {
            if first {
                self.write_fis_d2h_ncq(s, port, c.slot);
            }
            self.write_fis_sdb(s, port, &c, OK);
        } else {
            self.write_fis_d2h(s, port, &c, OK);
        }
        s.ports[port].pending &= !(1 << c.slot);
        Self::check_stopped(s, port);
        if !first {
            self.handle_port(s, port);
        }
    }

    /// READ LOG (DMA) EXT: the log directory, the NCQ command error log and the NCQ
    /// send/receive log.
    fn read_log(&self, s: &mut HbaState, port: usize, c: &Command) {
        let cfis = &c.cfis;
        let p = &s.ports[port];
        if p.atapi
            || c.prdt.is_empty()
            || cfis[5] != 0
            || cfis[9] != 0
            || cfis[12] != 1
            || cfis[13] != 0
        {
            self.write_fis_d2h(s, port, c, ABORTED);
            return;
        }
        let mut buf = [0u8; 512];
        match cfis[4] {
            0x00 => {
                buf[0] = 1;
                buf[0x20] = 1;
                buf[0x26] = 1;
            }
            0x10 => {
                buf[..20].copy_from_slice(&p.err_cfis);
                let sum = buf[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
                buf[511] = 0u8.wrapping_sub(sum);
            }
            0x13 => {
                if self.drives[port]
                    .as_ref()
                    .is_some_and(|d| d.info.can_delete && !d.info.readonly)
                {
                    buf[0] = 1;
                    buf[4] = 1;
                }
            }
            _ => {
                self.write_fis_d2h(s, port, c, ABORTED);
                return;
            }
        }
        if cfis[2] == READ_LOG_EXT {
            self.write_fis_piosetup(s, port);
        }
        self.reply(s, port, c, &buf, OK);
    }

    // -----------------------------------------------------------------------------------------
    // ATAPI

    /// End an ATAPI command with ILLEGAL REQUEST and additional sense code `asc`.
    fn atapi_error(&self, s: &mut HbaState, port: usize, c: &Command, asc: u8) {
        let p = &mut s.ports[port];
        p.sense_key = SENSE_ILLEGAL_REQUEST;
        p.asc = asc;
        let tfd = (u32::from(SENSE_ILLEGAL_REQUEST) << 12) | S_READY | S_ERROR;
        let mut c = c.clone();
        c.cfis[4] = (c.cfis[4] & !7) | I_CMD | I_IN;
        self.write_fis_d2h(s, port, &c, tfd);
    }

    /// End an ATAPI command with `data` (at most `limit` bytes of it).
    fn atapi_reply(&self, s: &mut HbaState, port: usize, c: &Command, data: &[u8], limit: usize) {
        let mut c = c.clone();
        c.cfis[4] = (c.cfis[4] & !7) | I_CMD | I_IN;
        self.reply(s, port, &c, &data[..data.len().min(limit)], OK);
    }

    fn media_size(&self, port: usize) -> (u64, u64) {
        self.drives[port].as_ref().map_or((0, 512), |d| {
            (d.info.size, u64::from(d.info.sector_size.max(1)))
        })
    }

    fn packet(self: &Arc<Self>, s: &mut HbaState, port: usize, c: Command) {
        let acmd: [u8; 16] = c.cfis[ACMD_OFFSET..ACMD_OFFSET + 16]
            .try_into()
            .unwrap_or_default();
        let be16 = |i: usize| usize::from(u16::from_be_bytes([acmd[i], acmd[i + 1]]));
        match acmd[0] {
            TEST_UNIT_READY | PREVENT_ALLOW => self.atapi_reply(s, port, &c, &[], 0),
            INQUIRY => {
                let data: Vec<u8> = if acmd[1] & 1 != 0 {
                    if acmd[2] != 0 {
                        self.atapi_error(s, port, &c, 0x24);
                        return;
                    }
                    vec![0x05, 0, 0, 1, 0]
                } else {
                    let mut b = vec![0x05, 0x80, 0x00, 0x21, 31, 0, 0, 0];
                    b.extend_from_slice(b"BHYVE   ");
                    b.extend_from_slice(b"BHYVE DVD-ROM   ");
                    b.extend_from_slice(b"001 ");
                    b
                };
                self.atapi_reply(s, port, &c, &data, usize::from(acmd[4]));
            }
            READ_CAPACITY => {
                let (size, _) = self.media_size(port);
                let sectors = (size / CD_SECTOR) as u32;
                let mut b = [0u8; 8];
                b[0..4].copy_from_slice(&sectors.wrapping_sub(1).to_be_bytes());
                b[4..8].copy_from_slice(&(CD_SECTOR as u32).to_be_bytes());
                self.atapi_reply(s, port, &c, &b, b.len());
            }
            READ_TOC => self.read_toc(s, port, &c, &acmd, be16(7)),
            REPORT_LUNS => {
                let mut b = [0u8; 16];
                b[3] = 8;
                self.atapi_reply(s, port, &c, &b, b.len());
            }
            READ_10 | READ_12 => {
                let lba = u64::from(u32::from_be_bytes([acmd[2], acmd[3], acmd[4], acmd[5]]));
                let count = if acmd[0] == READ_10 {
                    be16(7) as u64
                } else {
                    u64::from(u32::from_be_bytes([acmd[6], acmd[7], acmd[8], acmd[9]]))
                };
                if count == 0 {
                    self.atapi_reply(s, port, &c, &[], 0);
                    return;
                }
                if c.prdt.is_empty() {
                    self.atapi_error(s, port, &c, 0x21);
                    return;
                }
                let transfer = Transfer {
                    command: c,
                    offset: lba * CD_SECTOR,
                    len: count * CD_SECTOR,
                    done: 0,
                };
                self.continue_transfer(s, port, transfer, false, CD_SECTOR);
            }
            REQUEST_SENSE => {
                let p = &s.ports[port];
                let mut b = [0u8; 64];
                b[0] = 0x70 | (1 << 7);
                b[2] = p.sense_key;
                b[7] = 10;
                b[12] = p.asc;
                self.atapi_reply(s, port, &c, &b, usize::from(acmd[4]));
            }
            START_STOP_UNIT => {
                if acmd[4] & 3 == 2 {
                    // Eject: not possible.
                    self.atapi_error(s, port, &c, 0x53);
                } else {
                    self.atapi_reply(s, port, &c, &[], 0);
                }
            }
            MODE_SENSE_10 => {
                let len = be16(7);
                let pc = acmd[2] >> 6;
                let code = acmd[2] & 0x3f;
                match (pc, code) {
                    (0, MODEPAGE_RW_ERROR_RECOVERY) => {
                        let mut b = [0u8; 16];
                        b[0..2].copy_from_slice(&14u16.to_be_bytes());
                        b[2] = 0x70;
                        b[8] = 0x01;
                        b[9] = 6;
                        b[11] = 0x05;
                        self.atapi_reply(s, port, &c, &b, len);
                    }
                    (0, MODEPAGE_CD_CAPABILITIES) => {
                        let mut b = [0u8; 30];
                        b[0..2].copy_from_slice(&28u16.to_be_bytes());
                        b[2] = 0x70;
                        b[8] = 0x2a;
                        b[9] = 20;
                        b[10] = 0x08;
                        b[12] = 0x71;
                        b[18..20].copy_from_slice(&2u16.to_be_bytes());
                        b[20..22].copy_from_slice(&512u16.to_be_bytes());
                        self.atapi_reply(s, port, &c, &b, len);
                    }
                    // Saved values are not supported.
                    (3, _) => self.atapi_error(s, port, &c, 0x39),
                    _ => self.atapi_error(s, port, &c, 0x24),
                }
            }
            GET_EVENT_STATUS_NOTIFICATION => {
                if acmd[1] & 1 == 0 {
                    // Only polled operation.
                    self.atapi_error(s, port, &c, 0x24);
                } else {
                    let mut b = [0u8; 8];
                    b[0..2].copy_from_slice(&6u16.to_be_bytes());
                    b[2] = 0x04;
                    b[3] = 0x10;
                    b[5] = 0x02;
                    self.atapi_reply(s, port, &c, &b, be16(7));
                }
            }
            _ => self.atapi_error(s, port, &c, 0x20),
        }
    }

    fn read_toc(&self, s: &mut HbaState, port: usize, c: &Command, acmd: &[u8; 16], len: usize) {
        let (size, sector) = self.media_size(port);
        // bhyve counts the disk's sectors and divides by four: 2048-byte frames.
        let frames = (size / sector) >> 2;
        let msf = (acmd[1] >> 1) & 1 != 0;
        let address = |b: &mut Vec<u8>, lba: u64| {
            if msf {
                b.push(0);
                b.extend_from_slice(&lba_to_msf(lba));
            } else {
                b.extend_from_slice(&(lba as u32).to_be_bytes());
            }
        };
        let mut b = vec![0u8, 0];
        match acmd[9] >> 6 {
            0 => {
                let start = acmd[6];
                if start > 1 && start != 0xaa {
                    self.atapi_error(s, port, c, 0x24);
                    return;
                }
                b.extend_from_slice(&[1, 1]);
                if start <= 1 {
                    b.extend_from_slice(&[0, 0x14, 1, 0]);
                    address(&mut b, 0);
                }
                b.extend_from_slice(&[0, 0x14, 0xaa, 0]);
                address(&mut b, frames);
            }
            1 => {
                b = vec![0, 0xa, 0x1, 0x1, 0, 0, 0, 0, 0, 0, 0, 0];
                self.atapi_reply(s, port, c, &b, len);
                return;
            }
            2 => {
                b.extend_from_slice(&[1, 1]);
                b.extend_from_slice(&[1, 0x14, 0, 0xa0, 0, 0, 0, 0, 1, 0, 0]);
                b.extend_from_slice(&[1, 0x14, 0, 0xa1, 0, 0, 0, 0, 1, 0, 0]);
                b.extend_from_slice(&[1, 0x14, 0, 0xa2, 0, 0, 0]);
                address(&mut b, frames);
                b.extend_from_slice(&[1, 0x14, 0, 1, 0, 0, 0]);
                address(&mut b, 0);
            }
            _ => {
                self.atapi_error(s, port, c, 0x24);
                return;
            }
        }
        let total = (b.len() - 2) as u16;
        b[0..2].copy_from_slice(&total.to_be_bytes());
        self.atapi_reply(s, port, c, &b, len);
    }

    // -----------------------------------------------------------------------------------------
    // Registers

    fn port_write(self: &Arc<Self>, s: &mut HbaState, port: usize, offset: u64, value: u32) {
        let p = &mut s.ports[port];
        match offset {
            P_CLB => p.clb = value,
            P_CLBU => p.clbu = value,
            P_FB => p.fb = value,
            P_FBU => p.fbu = value,
            P_IS => {
                p.is &= !value;
                self.port_intr(s, port);
            }
            P_IE => {
                p.ie = value & P_IE_MASK;
                self.port_intr(s, port);
            }
            P_CMD => {
                p.cmd = (p.cmd & !P_CMD_WRITABLE) | (value & P_CMD_WRITABLE);
                if value & P_CMD_ST == 0 {
                    // Requests already on the backend run to completion; the state clears
                    // once they have.
                    Self::check_stopped(s, port);
                } else {
                    s.ports[port].cmd |= P_CMD_CR;
                }
                let p = &mut s.ports[port];
                if value & P_CMD_FRE != 0 {
                    p.cmd |= P_CMD_FR;
                } else {
                    p.cmd &= !P_CMD_FR;
                }
                if value & P_CMD_CLO != 0 {
                    p.tfd &= !(S_BUSY | S_DRQ);
                    p.cmd &= !P_CMD_CLO;
                }
                if value & P_CMD_ICC_MASK != 0 {
                    p.cmd &= !P_CMD_ICC_MASK;
                }
                self.handle_port(s, port);
            }
            P_SCTL => {
                p.sctl = value;
                if p.cmd & P_CMD_ST == 0 && value & SC_DET_RESET != 0 {
                    self.port_reset(s, port);
                }
            }
            P_SERR => p.serr &= !value,
            P_SACT => p.sact |= value,
            P_CI => {
                p.ci |= value;
                self.handle_port(s, port);
            }
            // TFD, SIG, SSTS are read-only; SNTF and FBS are not implemented.
            _ => {}
        }
    }

    fn host_write(self: &Arc<Self>, s: &mut HbaState, offset: u64, value: u32) {
        match offset {
            GHC => {
                if value & GHC_HR != 0 {
                    self.reset(s);
                    return;
                }
                if value & GHC_IE != 0 {
                    s.ghc |= GHC_IE;
                } else {
                    s.ghc &= !GHC_IE;
                }
                self.generate_intr(s, u32::MAX);
            }
            IS => {
                s.is &= !value;
                self.generate_intr(s, value);
            }
            _ => {}
        }
    }

    fn host_read(s: &HbaState, offset: u64) -> u32 {
        match offset {
            CAP => s.cap,
            GHC => s.ghc,
            IS => s.is,
            PI => s.pi,
            VS => s.vs,
            CAP2 => s.cap2,
            // CCC, enclosure management and BIOS handoff are not implemented.
            _ => 0,
        }
    }

    fn port_read(s: &HbaState, port: usize, offset: u64) -> u32 {
        let p = &s.ports[port];
        match offset {
            P_CLB => p.clb,
            P_CLBU => p.clbu,
            P_FB => p.fb,
            P_FBU => p.fbu,
            P_IS => p.is,
            P_IE => p.ie,
            P_CMD => p.cmd,
            P_TFD => p.tfd,
            P_SIG => p.sig,
            P_SSTS => p.ssts,
            P_SCTL => p.sctl,
            P_SERR => p.serr,
            P_SACT => p.sact,
            P_CI => p.ci,
            P_SNTF => p.sntf,
            P_FBS => p.fbs,
            _ => 0,
        }
    }
}

/// The AHCI controller on PCI.
pub struct Ahci {
    shared: Arc<Shared>,
}

impl Ahci {
    /// Set up the function's header, MSI (one message per port, up to 16), INTx and ABAR.
    pub fn new(
        attached: Vec<AttachedPort>,
        create: PciCreate<'_>,
    ) -> Result<Self, crate::devices::pci::PciError> {
        let config = create.config_space;
        config.write16(PCIR_DEVICE, DEVICE_ICH8_AHCI);
        config.write16(PCIR_VENDOR, VENDOR_INTEL);
        config.write8(PCIR_CLASS, PCIC_STORAGE);
        config.write8(PCIR_SUBCLASS, PCIS_STORAGE_SATA);
        config.write8(PCIR_PROGIF, PCIP_STORAGE_SATA_AHCI_1_0);
        let ports = MAX_PORTS;
        config.add_msi_capability(ports.min(16) as u32)?;
        config.request_bar(ABAR, BarKind::Mem32, PORT_OFFSET + ports as u64 * PORT_STEP);
        let intx = config.request_intx();
        let mut drives: Vec<Option<Drive>> = (0..ports).map(|_| None).collect();
        let mut state = HbaState {
            ports: vec![PortState::default(); ports],
            ..HbaState::default()
        };
        for a in attached {
            if a.index >= ports {
                continue;
            }
            state.pi |= 1 << a.index;
            state.ports[a.index].atapi = a.atapi;
            let info = a.backend.info();
            let strings = IdentityStrings {
                serial: &a.serial,
                revision: &a.revision,
                model: &a.model,
                rotation_rate: a.rotation_rate,
            };
            drives[a.index] = Some(Drive {
                identify: identify(a.atapi, &info, &strings),
                info,
                backend: Arc::new(a.backend),
            });
        }
        for p in &mut state.ports {
            p.err_cfis = vec![0; 20];
        }
        // Slots: 32 (bhyve's queue holds more requests than that).
        let slots = (MAX_SLOTS - 1) as u32;
        state.cap = CAP_64BIT
            | CAP_SNCQ
            | CAP_SSNTF
            | CAP_SMPS
            | CAP_SSS
            | CAP_SALP
            | CAP_SAL
            | CAP_SCLO
            | (3 << CAP_ISS_SHIFT)
            | CAP_PMD
            | CAP_SSC
            | CAP_PSC
            | (slots << CAP_NCS_SHIFT)
            | CAP_SXS
            | (ports as u32 - 1);
        state.vs = 0x10300;
        state.cap2 = CAP2_APST;
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            memory: create.memory.clone(),
            drives,
            intx,
            sink: create.interrupts.clone(),
            msi: Mutex::new(None),
        });
        {
            let mut s = shared.lock();
            shared.reset(&mut s);
        }
        Ok(Self { shared })
    }

    /// The controller's registers and port state.
    pub fn state(&self) -> HbaState {
        self.shared.lock().clone()
    }

    fn backends(&self) -> impl Iterator<Item = &Arc<BlockBackend>> {
        self.shared.drives.iter().flatten().map(|d| &d.backend)
    }

    fn mirror_msi(&self, config: &ConfigSpace) {
        *self.shared.msi.lock().unwrap_or_else(|e| e.into_inner()) = config
            .msi()
            .map(|(address, data, n)| (address, u32::from(data), n));
    }

    /// Load a saved state into a controller made from the same configuration.
    pub fn restore(&mut self, saved: &HbaState) -> Result<(), String> {
        let mut s = self.shared.lock();
        if saved.ports.len() != s.ports.len() || saved.pi != s.pi {
            return Err(format!(
                "ports {:#x} of {} saved, the controller has {:#x} of {}",
                saved.pi,
                saved.ports.len(),
                s.pi,
                s.ports.len()
            ));
        }
        for (i, (a, b)) in saved.ports.iter().zip(&s.ports).enumerate() {
            if a.atapi != b.atapi {
                return Err(format!("port {i}: saved as another device type"));
            }
            if a.pending != 0 {
                return Err(format!("port {i}: saved with requests in flight"));
            }
            if a.err_cfis.len() != 20 {
                return Err(format!("port {i}: bad error log"));
            }
        }
        let lintr = s.lintr;
        *s = saved.clone();
        // INTx follows the restored state.
        match (lintr, s.lintr) {
            (false, true) => self.shared.intx.assert(),
            (true, false) => self.shared.intx.deassert(),
            _ => {}
        }
        Ok(())
    }
}

impl PciDevice for Ahci {
    fn bar_read(&mut self, _config: &ConfigSpace, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let size = data.len();
        if bar != ABAR || !matches!(size, 1 | 2 | 4) || offset % size as u64 != 0 {
            return;
        }
        let s = self.shared.lock();
        let reg = offset & !3;
        let end = PORT_OFFSET + s.ports.len() as u64 * PORT_STEP;
        let value = if reg < PORT_OFFSET {
            Shared::host_read(&s, reg)
        } else if reg < end {
            let port = ((reg - PORT_OFFSET) / PORT_STEP) as usize;
            Shared::port_read(&s, port, (reg - PORT_OFFSET) % PORT_STEP)
        } else {
            0
        };
        let value = value >> (8 * (offset & 3));
        data.copy_from_slice(&value.to_le_bytes()[..size]);
    }

    fn bar_write(&mut self, _config: &ConfigSpace, bar: usize, offset: u64, data: &[u8]) {
        // The registers take aligned 32-bit writes only.
        if bar != ABAR || data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let shared = self.shared.clone();
        let mut s = shared.lock();
        let end = PORT_OFFSET + s.ports.len() as u64 * PORT_STEP;
        if offset < PORT_OFFSET {
            shared.host_write(&mut s, offset, value);
        } else if offset < end {
            let port = ((offset - PORT_OFFSET) / PORT_STEP) as usize;
            shared.port_write(&mut s, port, (offset - PORT_OFFSET) % PORT_STEP, value);
        }
    }

    fn config_written(&mut self, config: &ConfigSpace) {
        self.mirror_msi(config);
    }

    fn config_restored(&mut self, config: &ConfigSpace) {
        self.mirror_msi(config);
    }

    fn pause(&mut self) {
        for backend in self.backends() {
            backend.pause();
        }
    }

    fn resume(&mut self) {
        for backend in self.backends() {
            backend.resume();
        }
    }

    #[cfg(feature = "bhyve_snapshot")]
    fn save_device_state(&self) -> Option<Vec<u8>> {
        crate::snapshot::encode_section(&self.state()).ok()
    }

    #[cfg(feature = "bhyve_snapshot")]
    fn restore_device_state(&mut self, state: &[u8]) -> Result<(), String> {
        let state: HbaState = crate::snapshot::decode_section(state).map_err(|e| e.to_string())?;
        self.restore(&state)
    }
}

impl Drop for Ahci {
    fn drop(&mut self) {
        // Completions hold the shared state: let them finish before the backends go.
        for backend in self.backends() {
            backend.drain();
        }
    }
}

#[cfg(test)]
mod tests;
