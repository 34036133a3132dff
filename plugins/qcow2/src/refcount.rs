//! Refcount entries of any width (1..64 bits) inside a refcount block.

/// Reads entry `i` of `block`, `bits` wide (a power of two, 1..=64).
pub fn get(block: &[u8], bits: u32, i: usize) -> u64 {
    if bits < 8 {
        let per = 8 / bits as usize;
        let byte = block[i / per];
        let shift = (i % per) as u32 * bits;
        u64::from((byte >> shift) & ((1u16 << bits) - 1) as u8)
    } else {
        let n = bits as usize / 8;
        block[i * n..i * n + n]
            .iter()
            .fold(0u64, |a, &b| (a << 8) | u64::from(b))
    }
}

/// Sets entry `i` to `value`; returns the byte range of `block` that changed.
pub fn set(block: &mut [u8], bits: u32, i: usize, value: u64) -> std::ops::Range<usize> {
    if bits < 8 {
        let per = 8 / bits as usize;
        let shift = (i % per) as u32 * bits;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        let b = &mut block[i / per];
        *b = (*b & !mask) | (((value as u8) << shift) & mask);
        i / per..i / per + 1
    } else {
        let n = bits as usize / 8;
        let bytes = value.to_be_bytes();
        block[i * n..i * n + n].copy_from_slice(&bytes[8 - n..]);
        i * n..i * n + n
    }
}

/// The largest value an entry of `bits` can hold.
pub fn max(bits: u32) -> u64 {
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn all_widths_round_trip() {
        for order in 0..=6 {
            let bits = 1u32 << order;
            let mut b = vec![0u8; 64];
            let n = 64 * 8 / bits as usize;
            for i in 0..n {
                super::set(&mut b, bits, i, (i as u64 * 7) & super::max(bits));
            }
            for i in 0..n {
                assert_eq!(
                    super::get(&b, bits, i),
                    (i as u64 * 7) & super::max(bits),
                    "bits {bits} i {i}"
                );
            }
        }
    }
}
