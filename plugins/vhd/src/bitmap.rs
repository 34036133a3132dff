//! The per-block sector bitmap: bit 7 of byte 0 is the block's first sector. Set = the
//! sector's data is in this file; clear = it falls through to the parent (or reads zero).

/// Whether sector `i` of the block is present.
pub fn is_set(bitmap: &[u8], i: usize) -> bool {
    bitmap
        .get(i / 8)
        .is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

/// Marks sectors `[from, from + n)` present.
pub fn set_range(bitmap: &mut [u8], from: usize, n: usize) {
    for i in from..from + n {
        if let Some(b) = bitmap.get_mut(i / 8) {
            *b |= 0x80 >> (i % 8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msb_first() {
        let mut b = [0u8; 2];
        set_range(&mut b, 1, 8);
        assert_eq!(b, [0x7f, 0x80]);
        assert!(!is_set(&b, 0) && is_set(&b, 1) && is_set(&b, 8) && !is_set(&b, 9));
        assert!(!is_set(&b, 100));
    }
}
