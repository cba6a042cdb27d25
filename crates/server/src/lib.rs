//! hintfed-server library.
#![forbid(unsafe_code)]
