//! Intel MultiProcessor Specification 1.4 table.
