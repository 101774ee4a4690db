//! When a collection that grew large and emptied gives its memory back.

/// The capacity to shrink a collection of `len` items and `capacity` slots
/// to, if it should: half, once three quarters are unused. Halving rather
/// than fitting, so that a set hovering around a size does not reallocate
/// back and forth; small collections are left alone.
pub(crate) fn shrink_target(len: usize, capacity: usize) -> Option<usize> {
    (capacity > 64 && len < capacity / 4).then_some(capacity / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_mostly_empty_collection_halves() {
        assert_eq!(shrink_target(100, 1024), Some(512));
    }

    #[test]
    fn a_quarter_full_or_small_collection_keeps_its_capacity() {
        assert_eq!(shrink_target(256, 1024), None);
        assert_eq!(shrink_target(1, 64), None);
    }
}
