//! hintfed-agent library.
#![forbid(unsafe_code)]
