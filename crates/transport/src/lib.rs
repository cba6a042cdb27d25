//! hintfed transports.
#![forbid(unsafe_code)]
