//! A cheap keyed hash for maps keyed by [`Digest`](zest_oci::digest::Digest).
//!
//! The cache's maps are looked up under a mutex on every FUSE read, so the hash must be
//! cheap: SipHash spends more time on a 32-byte key than the rest of the lookup. A
//! digest is already uniformly distributed, but the chunks (and so their digests) come
//! from untrusted images: with an unkeyed hash an attacker could grind chunks whose
//! digests share the bucket bits and turn lookups linear. So each map gets random keys
//! and every 8-byte word is mixed with a folded 64x64->128 multiply, which an attacker
//! who does not know the keys cannot aim at a bucket.

use std::hash::{BuildHasher, Hasher};

/// Builds [`DigestHasher`]s with per-map random keys.
#[derive(Clone, Debug)]
pub(crate) struct DigestHashBuilder {
    k0: u64,
    k1: u64,
}

impl DigestHashBuilder {
    /// Fresh random keys.
    pub(crate) fn new() -> Self {
        // `| 1` keeps the multiplier odd so no input bit is shifted out entirely.
        DigestHashBuilder {
            k0: rand::random::<u64>(),
            k1: rand::random::<u64>() | 1,
        }
    }
}

impl BuildHasher for DigestHashBuilder {
    type Hasher = DigestHasher;

    fn build_hasher(&self) -> DigestHasher {
        DigestHasher {
            state: self.k0,
            key: self.k1,
        }
    }
}

/// The hasher built by [`DigestHashBuilder`]; good for any key, fast for short ones.
#[derive(Debug)]
pub(crate) struct DigestHasher {
    state: u64,
    key: u64,
}

#[inline]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

impl Hasher for DigestHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for word in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            self.state = folded_multiply(self.state ^ u64::from_le_bytes(w), self.key);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            // The length goes in the top byte so "ab" and "ab\0" differ.
            let tagged = u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56);
            self.state = folded_multiply(self.state ^ tagged, self.key);
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.state = folded_multiply(self.state ^ n, self.key);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // One more round so the last word's bits reach every output bit.
        folded_multiply(self.state, self.key.rotate_left(32) | 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use zest_oci::digest::Digest;

    #[test]
    fn distinct_digests_get_distinct_hashes_and_same_digest_same_hash() {
        let b = DigestHashBuilder::new();
        let mut seen = HashSet::new();
        for i in 0u32..10_000 {
            let d = Digest::of(&i.to_le_bytes());
            assert_eq!(b.hash_one(d), b.hash_one(d));
            seen.insert(b.hash_one(d));
        }
        // 64-bit hashes of 10k distinct keys: a collision here means a broken mix.
        assert_eq!(seen.len(), 10_000);
    }

    #[test]
    fn low_bits_spread_even_when_inputs_share_them() {
        // Digests that agree on every low-order byte must still land in many buckets.
        let b = DigestHashBuilder::new();
        let mut buckets = HashSet::new();
        for i in 0u8..=255 {
            let mut raw = [0u8; 32];
            raw[31] = i;
            buckets.insert(b.hash_one(Digest::from_bytes(raw)) & 0xff);
        }
        assert!(
            buckets.len() > 128,
            "only {} of 256 buckets used",
            buckets.len()
        );
    }
}
