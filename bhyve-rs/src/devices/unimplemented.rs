//! PCI emulations FreeBSD's bhyve has and this build does not implement yet. They stay in the
//! registry so that `-s` parses their option strings into the keys FreeBSD would store (a
//! configuration can be dumped and checked), and so that a VM naming one is refused with
//! "not supported yet" rather than "unknown device". Implementing one means giving it a module
//! with its device and its entry there, and moving its parser along.

use super::registry::PciEmulation;
use crate::config::cnum::scan_ints;
use crate::config::legacy::{generic, LegacyError, LegacyParser, LegacyWriter};

const fn known(name: &'static str, legacy_config: LegacyParser) -> PciEmulation {
    PciEmulation {
        name,
        alias_of: None,
        legacy_config,
        plan: None,
    }
}

pub const FBUF: PciEmulation = known("fbuf", generic);
pub const HDA: PciEmulation = known("hda", generic);
pub const PASSTHRU: PciEmulation = known("passthru", passthru);
pub const UART: PciEmulation = known("uart", uart);
pub const VIRTIO_9P: PciEmulation = known("virtio-9p", nine_p);
pub const VIRTIO_INPUT: PciEmulation = known("virtio-input", input);
pub const VIRTIO_SCSI: PciEmulation = known("virtio-scsi", scsi);
pub const XHCI: PciEmulation = known("xhci", xhci);

/// pci_virtio_scsi.c: the first token is `dev`.
fn scsi(w: &mut LegacyWriter<'_>, node: &str, conf: Option<&str>) -> Result<(), LegacyError> {
    w.first_token_then_generic(node, "dev", conf)
}

/// pci_virtio_input.c: the first token is `path`, and required.
fn input(w: &mut LegacyWriter<'_>, node: &str, conf: Option<&str>) -> Result<(), LegacyError> {
    match conf {
        // FreeBSD refuses a missing device path with exit status 4 and no word; say why.
        None => Err(LegacyError::Invalid(
            "virtio-input: a device path is required (-s SLOT,virtio-input,/dev/input/eventN)"
                .to_string(),
        )),
        Some(_) => w.first_token_then_generic(node, "path", conf),
    }
}

/// pci_uart.c: the whole string is `path`.
fn uart(w: &mut LegacyWriter<'_>, node: &str, conf: Option<&str>) -> Result<(), LegacyError> {
    match conf {
        Some(path) => w.set(node, "path", path),
        None => Ok(()),
    }
}

/// pci_virtio_9p.c: `sharename=path` plus flags.
fn nine_p(w: &mut LegacyWriter<'_>, node: &str, conf: Option<&str>) -> Result<(), LegacyError> {
    let Some(conf) = conf else {
        return Ok(());
    };
    let mut have_share = false;
    for token in conf.split(',') {
        match token.split_once('=') {
            Some((share, path)) => {
                if have_share {
                    return Err(LegacyError::Invalid(
                        "virtio-9p: more than one share name given".to_string(),
                    ));
                }
                have_share = true;
                w.set(node, "sharename", share)?;
                w.set(node, "path", path)?;
            }
            None => w.set(node, token, "true")?,
        }
    }
    Ok(())
}

/// pci_passthru.c: `pptN`, `pci0:B:S:F`, `pciB:S:F` or `B/S/F`, then generic.
fn passthru(w: &mut LegacyWriter<'_>, node: &str, conf: Option<&str>) -> Result<(), LegacyError> {
    let Some(conf) = conf else {
        return Ok(());
    };
    let (first, rest) = match conf.split_once(',') {
        Some((f, r)) => (f, Some(r)),
        None => (conf, None),
    };
    if conf.starts_with("ppt") {
        w.set(node, "pptdev", first)?;
    } else {
        // sscanf reads the whole string; trailing options after the three numbers are fine.
        let bsf = [
            scan_ints(conf, "pci0:%d:%d:%d"),
            scan_ints(conf, "pci%d:%d:%d"),
            scan_ints(conf, "%d/%d/%d"),
        ]
        .into_iter()
        .find(|v| v.len() == 3);
        let Some(bsf) = bsf else {
            return Err(LegacyError::Invalid(format!(
                "passthru: invalid options \"{conf}\""
            )));
        };
        w.set(node, "bus", &bsf[0].to_string())?;
        w.set(node, "slot", &bsf[1].to_string())?;
        w.set(node, "func", &bsf[2].to_string())?;
    }
    w.generic(node, rest)
}

/// pci_xhci.c: USB devices, one per slot starting at 1.
fn xhci(w: &mut LegacyWriter<'_>, node: &str, conf: Option<&str>) -> Result<(), LegacyError> {
    let Some(conf) = conf else {
        return Ok(());
    };
    let slots = format!("{node}.slot");
    w.create(&slots)?;
    for (i, opt) in conf.split(',').enumerate() {
        let (device, dev_conf) = match opt.split_once('=') {
            Some((d, c)) => (d, Some(c)),
            None => (opt, None),
        };
        let slot_node = format!("{slots}.{}", i + 1);
        w.create(&slot_node)?;
        w.set(&slot_node, "device", device)?;
        if let Some(c) = dev_conf.filter(|c| !c.is_empty()) {
            w.generic(&slot_node, Some(c))?;
        }
    }
    Ok(())
}
