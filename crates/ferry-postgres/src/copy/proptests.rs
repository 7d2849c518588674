//! Property tests of [`CopyDecoder`]: generated binary COPY streams, split at arbitrary chunk
//! boundaries, decode to the tuples they were made from; arbitrary chunked input never makes
//! it panic.
//!
//! 512 cases a test; `PROPTEST_CASES` sets another number (see the README's "Fuzzing").

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

type Row = Vec<Option<Vec<u8>>>;

/// A stream's contents: the header's flags and extension area, and the tuples.
#[derive(Debug, Clone)]
struct Stream {
    columns: usize,
    flags: i32,
    extension: Vec<u8>,
    rows: Vec<Row>,
}

fn stream() -> impl Strategy<Value = Stream> {
    (0usize..6).prop_flat_map(|columns| {
        // Field lengths from empty to a few hundred bytes, so tuples straddle chunks.
        let field = prop::option::weighted(0.8, vec(any::<u8>(), 0..300));
        (
            any::<i32>(),
            vec(any::<u8>(), 0..12),
            vec(vec(field, columns), 0..12),
        )
            .prop_map(move |(flags, extension, rows)| Stream {
                columns,
                flags,
                extension,
                rows,
            })
    })
}

/// `COPY … TO STDOUT (FORMAT binary)` as Postgres writes it.
fn encode(stream: &Stream) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.extend_from_slice(&stream.flags.to_be_bytes());
    let extension = i32::try_from(stream.extension.len()).unwrap_or(i32::MAX);
    out.extend_from_slice(&extension.to_be_bytes());
    out.extend_from_slice(&stream.extension);
    for row in &stream.rows {
        let count = i16::try_from(row.len()).unwrap_or(i16::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for field in row {
            match field {
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    let len = i32::try_from(v.len()).unwrap_or(i32::MAX);
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(v);
                }
            }
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// `bytes` split before each of `cuts` (positions taken modulo the length; repeats give
/// empty chunks, which the decoder must take too).
fn chunks<'a>(bytes: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    at.sort_unstable();
    let mut pieces = Vec::with_capacity(at.len() + 1);
    let mut start = 0;
    for end in at {
        pieces.push(&bytes[start..end]);
        start = end;
    }
    pieces.push(&bytes[start..]);
    pieces
}

/// Feeds every chunk, even after an error, as a careless caller would; returns the rows
/// handed out and the first error. The returned row counts must match the handler's calls.
fn feed_all(columns: usize, pieces: &[&[u8]]) -> (Vec<Row>, Option<CopyError>) {
    let mut decoder = CopyDecoder::new(columns);
    let mut rows = Vec::new();
    let mut first_error = None;
    for piece in pieces {
        let before = rows.len();
        let result = decoder.feed(piece, |fields| {
            let row: Row = fields.map(|f| f.map(<[u8]>::to_vec)).collect();
            assert_eq!(
                row.len(),
                columns,
                "a tuple of the wrong width was handed out"
            );
            rows.push(row);
            Ok::<_, ()>(())
        });
        match result {
            Ok(n) => assert_eq!(usize::try_from(n).ok(), Some(rows.len() - before)),
            Err(DecodeError::Copy(e)) => {
                first_error.get_or_insert(e);
            }
            Err(DecodeError::Row(())) => unreachable!("the handler never fails"),
        }
    }
    if first_error.is_none() {
        first_error = decoder.finish().err();
    }
    (rows, first_error)
}

proptest! {
    #![proptest_config(crate::proptest_config(512))]

    #[test]
    fn generated_streams_decode_to_their_tuples_at_any_chunking(
        stream in stream(),
        cuts in vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let bytes = encode(&stream);
        let (rows, error) = feed_all(stream.columns, &chunks(&bytes, &cuts));
        prop_assert_eq!(error, None);
        prop_assert_eq!(rows, stream.rows);
    }

    #[test]
    fn a_stream_cut_short_is_truncated(
        stream in stream(),
        cut in any::<prop::sample::Index>(),
        cuts in vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let bytes = encode(&stream);
        let short = &bytes[..cut.index(bytes.len())];
        let (rows, error) = feed_all(stream.columns, &chunks(short, &cuts));
        prop_assert_eq!(error, Some(CopyError::Truncated));
        // What was handed out is a prefix of the tuples.
        prop_assert_eq!(&rows[..], &stream.rows[..rows.len()]);
    }

    #[test]
    fn a_failing_row_handler_stops_the_stream(
        stream in stream(),
        fail_at in any::<prop::sample::Index>(),
    ) {
        let mut decoder = CopyDecoder::new(stream.columns);
        let mut seen = 0;
        let fail_at = fail_at.index(stream.rows.len().max(1));
        let result = decoder.feed(&encode(&stream), |_| {
            seen += 1;
            if seen > fail_at { Err("stop") } else { Ok(()) }
        });
        if stream.rows.is_empty() {
            prop_assert!(matches!(result, Ok(0)));
        } else {
            prop_assert!(matches!(result, Err(DecodeError::Row("stop"))));
            prop_assert_eq!(seen, fail_at + 1);
        }
    }

    #[test]
    fn arbitrary_chunked_input_never_panics(
        columns in 0usize..5,
        signature in any::<bool>(),
        bytes in vec(any::<u8>(), 0..512),
        cuts in vec(any::<prop::sample::Index>(), 0..8),
    ) {
        // With the signature in front the bytes reach the tuple parser, not only the header.
        let mut input = if signature { SIGNATURE.to_vec() } else { Vec::new() };
        input.extend_from_slice(&bytes);
        feed_all(columns, &chunks(&input, &cuts));
    }

    #[test]
    fn corrupted_streams_never_panic(
        stream in stream(),
        overwrites in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cuts in vec(any::<prop::sample::Index>(), 0..8),
        columns in prop::option::of(0usize..6),
    ) {
        let mut bytes = encode(&stream);
        for (at, byte) in &overwrites {
            let at = at.index(bytes.len());
            bytes[at] = *byte;
        }
        // Sometimes decoded with the wrong column count, as after a schema mix-up.
        feed_all(columns.unwrap_or(stream.columns), &chunks(&bytes, &cuts));
    }
}
