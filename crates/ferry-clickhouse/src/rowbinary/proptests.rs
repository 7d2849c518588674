//! Property tests of reading RowBinary back: arbitrary bytes never make [`RowSplitter`] or
//! [`render`] panic, and a prefix of a row that splits is incomplete, never an error.
//!
//! 2048 cases a test; `PROPTEST_CASES` sets another number (see the README's "Fuzzing").

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

fn shape() -> impl Strategy<Value = Shape> {
    // Width 0 never comes from a column kind (and would let an array count spin).
    let leaf = prop_oneof![(1usize..=32).prop_map(Shape::Fixed), Just(Shape::String)];
    leaf.prop_recursive(3, 8, 1, |inner| {
        prop_oneof![
            inner.clone().prop_map(|s| Shape::Nullable(Box::new(s))),
            inner.prop_map(|s| Shape::Array(Box::new(s))),
        ]
    })
}

proptest! {
    #![proptest_config(crate::proptest_config(2048))]

    #[test]
    fn splitting_arbitrary_bytes_never_panics(
        shapes in vec(shape(), 0..6),
        bytes in vec(any::<u8>(), 0..128),
    ) {
        let mut splitter = RowSplitter::new(shapes.clone());
        if let Ok(Some(len)) = splitter.split(&bytes) {
            prop_assert!(len <= bytes.len());
            for i in 0..shapes.len() {
                let _ = &bytes[splitter.column(i)];
            }
            // Every strict prefix of the row is incomplete.
            for cut in 0..len {
                prop_assert_eq!(splitter.split(&bytes[..cut]), Ok(None));
            }
        }
    }

    #[test]
    fn rendering_arbitrary_bytes_never_panics(
        kind in crate::text::proptests::value_kind(),
        nullable in any::<bool>(),
        bytes in vec(any::<u8>(), 0..80),
    ) {
        let _ = render(&kind, nullable, &bytes);
    }
}
