//! Any bytes as one value of a column of any mapped kind, in Postgres's binary form and in
//! its text form: the first byte picks the column and the form, the rest is the value. A
//! value the transcoder accepts is a row the RowBinary splitter splits exactly.

#![no_main]

use ferry_clickhouse::rowbinary::{RowSplitter, Shape};
use ferry_clickhouse::transcode::RowTranscoder;
use ferry_clickhouse::types::MappingOptions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, value)) = data.split_first() else {
        return;
    };
    let columns = ferry_fuzz::columns();
    let column = &columns[usize::from(first >> 1) % columns.len()];
    let columns = std::slice::from_ref(column);
    let options = MappingOptions::default();
    let mut transcoder = RowTranscoder::new(columns, options);
    let mut out = Vec::new();
    let written = if first & 1 == 0 {
        transcoder.write_row([Some(value)], 1, false, &mut out)
    } else {
        transcoder.write_text_row([Some(value)], 1, false, &mut out)
    };
    if written.is_ok() {
        let mut splitter = RowSplitter::for_columns(columns, options)
            .followed_by(Shape::Fixed(16))
            .followed_by(Shape::Fixed(1));
        assert_eq!(splitter.split(&out), Ok(Some(out.len())));
    }
});
