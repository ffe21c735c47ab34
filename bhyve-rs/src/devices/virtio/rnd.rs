//! virtio-rnd as bhyve's `pci_virtio_rnd.c`: one queue of 64 entries whose buffers the device
//! fills with the host's entropy (getrandom(2) here, /dev/random in bhyve), no configuration.

use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::pci::{use_msix, VirtioPci};
use super::{VirtQueue, VirtioDevice, VirtioIdentity, VirtioShared, VIRTIO_DEV_RANDOM};
use crate::config::legacy::generic;
use crate::devices::pci::{PciAddress, PciDevice, PCIC_CRYPTO};
use crate::devices::registry::{CreatePci, PciEmulation, PciPlan};
use crate::devices::DeviceError;

pub const EMULATION: PciEmulation = PciEmulation {
    name: "virtio-rnd",
    alias_of: None,
    legacy_config: generic,
    plan: Some(plan),
};

/// Entries of the queue (`VTRND_RINGSZ`).
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes one request gets, so a guest cannot make the host produce gigabytes at once.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

fn plan(plan: &mut PciPlan<'_>, _slot: PciAddress) -> Result<CreatePci, DeviceError> {
    let msix = use_msix(plan.config)?;
    Ok(Box::new(move |create| {
        Ok(Box::new(VirtioPci::new(
            Box::new(VirtioRandom::default()),
            create,
            msix,
        )?) as Box<dyn PciDevice>)
    }))
}

/// Fill `buf` from the host's entropy pool.
fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// A virtio entropy device.
#[derive(Default)]
pub struct VirtioRandom {
    queue: Option<Arc<VirtQueue>>,
}

impl VirtioDevice for VirtioRandom {
    fn name(&self) -> &'static str {
        "vtrnd"
    }

    fn identity(&self) -> VirtioIdentity {
        VirtioIdentity {
            pci_device_id: VIRTIO_DEV_RANDOM,
            device_type: VIRTIO_ID_RNG as u16,
            class: PCIC_CRYPTO,
            subclass: 0,
        }
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn host_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn config_size(&self) -> usize {
        0
    }

    fn read_config(&self, _offset: usize, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn attach(&mut self, queues: &[Arc<VirtQueue>], _shared: &Arc<VirtioShared>) {
        self.queue = queues.first().cloned();
    }

    fn queue_notify(&mut self, _queue: usize) {
        let Some(queue) = &self.queue else {
            return;
        };
        while let Some(chain) = queue.pop() {
            let len = (chain.writable_len() as usize).min(MAX_REQUEST_BYTES);
            let mut bytes = vec![0u8; len];
            let written = match host_random(&mut bytes)
                .ok()
                .and_then(|()| chain.write(queue.memory(), 0, &bytes).ok())
            {
                Some(()) => len as u32,
                None => {
                    log::warn!("vtrnd: cannot provide entropy");
                    0
                }
            };
            queue.add_used(chain.head, written);
        }
        queue.end_chains(true);
    }

    fn reset(&mut self) {}

    fn save_state(&self) -> Option<Vec<u8>> {
        Some(Vec::new())
    }
}
