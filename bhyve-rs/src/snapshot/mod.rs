//! Snapshot save and restore (feature `bhyve_snapshot`).
