//! Any bytes as a binary COPY stream, fed in chunks: the first byte picks the column count
//! and the chunk size, the rest is the stream. Errors are fine, panics are not; every tuple
//! handed out has the table's width.

#![no_main]

use ferry_postgres::copy::CopyDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let columns = usize::from(first % 8);
    let chunk = usize::from(first / 8) + 1;
    let mut decoder = CopyDecoder::new(columns);
    for piece in stream.chunks(chunk) {
        let fed = decoder.feed(piece, |fields| {
            assert_eq!(fields.count(), columns);
            Ok::<_, ()>(())
        });
        if fed.is_err() {
            return;
        }
    }
    let _ = decoder.finish();
});
