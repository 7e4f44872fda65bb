//! The Azure Blob tier (G4), built on `object_store`'s Azure support.
//!
//! In progress (issue 5). What is here: [`container::create_container`],
//! because `object_store` cannot create containers and a user's first run
//! against a fresh account (or the Azurite emulator in tests) needs one.
//! Next: the tier itself (hash-prefixed object names, conditional create,
//! size and checksum verified on read) and lazy writeback from a durable
//! dirty log.

pub mod container;
