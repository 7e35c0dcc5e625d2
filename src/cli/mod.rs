//! The `sdsparse` command line: thin wrappers that parse flags and call the library.

pub mod convert;
pub mod demo;
pub mod generate;
pub mod inspect;
pub mod sweep;
