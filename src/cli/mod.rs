//! The `sdsparse` command line: thin wrappers that parse flags and call the library.

/// `println!` that returns an error instead of panicking when standard output is closed
/// (`sdsparse inspect X | head -1`): the caller's `?` turns it into the one-line error.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)
            .map_err(|e| anyhow::anyhow!("cannot write to standard output: {e}"))?;
    }};
}

pub mod convert;
pub mod demo;
pub mod generate;
pub mod inspect;
pub mod plan;
pub mod sweep;
