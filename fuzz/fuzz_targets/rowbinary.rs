//! Any bytes as RowBinary read back from ClickHouse: the first byte picks a column of any
//! mapped kind, the rest is split as a row of it and shown as text. Never a panic.

#![no_main]

use ferry_clickhouse::rowbinary::{RowSplitter, render};
use ferry_clickhouse::types::{MappingOptions, value_kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    let columns = ferry_fuzz::columns();
    let column = &columns[usize::from(first) % columns.len()];
    let options = MappingOptions::default();
    let mut splitter = RowSplitter::for_columns(std::slice::from_ref(column), options);
    if let Ok(Some(len)) = splitter.split(bytes) {
        assert!(len <= bytes.len());
    }
    let _ = render(&value_kind(column, options), column.nullable, bytes);
});
