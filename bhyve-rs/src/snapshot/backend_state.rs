//! The hypervisor-held state of a VM or a vCPU as the `vm` and `vcpu` sections carry it.

use serde::{Deserialize, Serialize};

use crate::vmm::{BackendState, StateSection};

/// Payload version of the `vm` and `vcpu` sections. Version 2 added the vCPU's CPUID and TSC
/// rate. Each device part has its own ([`crate::devices::Persist::state_version`]).
pub const BACKEND_STATE_VERSION: u32 = 2;

/// The hypervisor-held state of the VM or of one vCPU, as the `vm` and `vcpu` sections hold
/// it: the backend's name and its named sub-sections in restore order.
#[derive(Serialize, Deserialize)]
pub struct BackendStatePayload {
    backend: String,
    sections: Vec<(String, Vec<u8>)>,
}

impl From<&BackendState> for BackendStatePayload {
    fn from(state: &BackendState) -> Self {
        Self {
            backend: state.backend.clone(),
            sections: state
                .sections
                .iter()
                .map(|s| (s.name.clone(), s.bytes.clone()))
                .collect(),
        }
    }
}

impl From<BackendStatePayload> for BackendState {
    fn from(payload: BackendStatePayload) -> Self {
        Self {
            backend: payload.backend,
            sections: payload
                .sections
                .into_iter()
                .map(|(name, bytes)| StateSection { name, bytes })
                .collect(),
        }
    }
}

/// Decode a `vm` or `vcpu` section's payload, e.g. to compare two snapshots.
pub fn decode_backend_state(payload: &[u8]) -> Result<BackendState, String> {
    super::decode_section::<BackendStatePayload>(payload)
        .map(BackendState::from)
        .map_err(|e| e.to_string())
}
