//! Image conversion to zstd:chunked.
