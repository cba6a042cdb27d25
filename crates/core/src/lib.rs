//! hintfed's federation core: pure logic with no sockets and no clock of its own.
#![forbid(unsafe_code)]
