//! Helpers for the end-to-end tests: locating the built binaries, free ports, process guards.
#![forbid(unsafe_code)]
