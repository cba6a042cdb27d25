//! hintfed-sim library.
#![forbid(unsafe_code)]
