//! Comparing the rows of a table on both sides, as RowBinary bytes.
//!
//! Postgres rows are transcoded to the bytes Ferry would write; ClickHouse rows are read back
//! as RowBinary; equal values are equal bytes. Memory stays small whatever the row width: a
//! keyed table keeps its key bytes and a 128-bit hash of each Postgres row, a keyless table one
//! counter per distinct row hash.
//!
//! A comparison can be limited to the keys (or row hashes) that differed in an earlier pass,
//! so a recheck at a fresh snapshot reports only the differences that persist.

use std::collections::{HashMap, HashSet};

use twox_hash::XxHash3_128;

/// Examples kept per kind of difference.
pub const EXAMPLES: usize = 5;
/// Row bytes a keyless comparison keeps to show examples (rows, at most).
const KEPT_ROWS: usize = 1000;

/// Differences found in one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Live rows read from Postgres.
    pub postgres_rows: u64,
    /// Live rows read from ClickHouse.
    pub clickhouse_rows: u64,
    /// Rows (keyless: copies) in Postgres and not in ClickHouse.
    pub missing: u64,
    /// Rows (keyless: copies) in ClickHouse and not in Postgres.
    pub extra: u64,
    /// Keys on both sides with different values.
    pub differing: u64,
    /// Up to [`EXAMPLES`] key bytes (keyless: row bytes and copies) of each kind.
    pub missing_examples: Vec<(Vec<u8>, u64)>,
    /// See `missing_examples`.
    pub extra_examples: Vec<(Vec<u8>, u64)>,
    /// See `missing_examples`.
    pub differing_examples: Vec<(Vec<u8>, u64)>,
}

impl Tally {
    /// No differences.
    pub fn is_equal(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.differing == 0
    }
}

fn example(list: &mut Vec<(Vec<u8>, u64)>, bytes: &[u8], copies: u64) {
    if list.len() < EXAMPLES {
        list.push((bytes.to_vec(), copies));
    }
}

/// The hash rows are compared by.
pub fn row_hash(row: &[u8]) -> u128 {
    XxHash3_128::oneshot(row)
}

/// Compares a table with a key: Postgres rows first, then ClickHouse's latest live row per key.
#[derive(Debug, Default)]
pub struct KeyedComparison {
    expected: HashMap<Box<[u8]>, u128>,
    only: Option<HashSet<Box<[u8]>>>,
    differing_keys: HashSet<Box<[u8]>>,
    tally: Tally,
}

impl KeyedComparison {
    /// A comparison of every key, or only of the keys in `only`.
    pub fn new(only: Option<HashSet<Box<[u8]>>>) -> Self {
        Self {
            only,
            ..Self::default()
        }
    }

    fn skipped(&self, key: &[u8]) -> bool {
        self.only.as_ref().is_some_and(|only| !only.contains(key))
    }

    /// A Postgres row: its key columns' bytes and all its columns' bytes. Every Postgres row
    /// must come before the first ClickHouse row.
    pub fn postgres_row(&mut self, key: &[u8], row: &[u8]) {
        self.tally.postgres_rows += 1;
        if !self.skipped(key) {
            self.expected.insert(key.into(), row_hash(row));
        }
    }

    /// A live ClickHouse row (the latest version of its key, not deleted).
    pub fn clickhouse_row(&mut self, key: &[u8], row: &[u8]) {
        self.tally.clickhouse_rows += 1;
        if self.skipped(key) {
            return;
        }
        match self.expected.remove(key) {
            Some(hash) if hash == row_hash(row) => {}
            Some(_) => {
                self.tally.differing += 1;
                example(&mut self.tally.differing_examples, key, 1);
                self.differing_keys.insert(key.into());
            }
            None => {
                self.tally.extra += 1;
                example(&mut self.tally.extra_examples, key, 1);
                self.differing_keys.insert(key.into());
            }
        }
    }

    /// The differences, and the set of every key that differed (to recheck).
    pub fn finish(mut self) -> (Tally, HashSet<Box<[u8]>>) {
        for key in self.expected.into_keys() {
            self.tally.missing += 1;
            example(&mut self.tally.missing_examples, &key, 1);
            self.differing_keys.insert(key);
        }
        // Deterministic examples for the keys left in the map (hash order otherwise).
        self.tally.missing_examples.sort();
        (self.tally, self.differing_keys)
    }
}

/// Compares a keyless table as multisets of rows: ClickHouse holds one row per event, a live
/// row adding a copy of its values and a deleted row removing one.
#[derive(Debug, Default)]
pub struct MultisetComparison {
    /// Postgres copies minus ClickHouse copies, per row hash.
    balance: HashMap<u128, i64>,
    only: Option<HashSet<u128>>,
    /// Row bytes of hashes in `only`, to show as examples.
    kept: HashMap<u128, Box<[u8]>>,
    tally: Tally,
}

impl MultisetComparison {
    /// A comparison of every row, or only of rows whose hash is in `only`.
    pub fn new(only: Option<HashSet<u128>>) -> Self {
        Self {
            only,
            ..Self::default()
        }
    }

    fn count(&mut self, row: &[u8], delta: i64) {
        let hash = row_hash(row);
        if let Some(only) = &self.only {
            if !only.contains(&hash) {
                return;
            }
            if self.kept.len() < KEPT_ROWS && !self.kept.contains_key(&hash) {
                self.kept.insert(hash, row.into());
            }
        }
        *self.balance.entry(hash).or_default() += delta;
    }

    /// A Postgres row (all its columns' bytes).
    pub fn postgres_row(&mut self, row: &[u8]) {
        self.tally.postgres_rows += 1;
        self.count(row, 1);
    }

    /// A ClickHouse row event: `deleted` removes a copy of `row`, otherwise it adds one.
    pub fn clickhouse_row(&mut self, row: &[u8], deleted: bool) {
        if deleted {
            self.tally.clickhouse_rows = self.tally.clickhouse_rows.saturating_sub(1);
            self.count(row, 1);
        } else {
            self.tally.clickhouse_rows += 1;
            self.count(row, -1);
        }
    }

    /// The differences, and the hashes of the rows that differed (to recheck).
    pub fn finish(mut self) -> (Tally, HashSet<u128>) {
        let mut differing = HashSet::new();
        let mut unbalanced: Vec<(u128, i64)> =
            self.balance.into_iter().filter(|(_, n)| *n != 0).collect();
        unbalanced.sort_unstable();
        for (hash, balance) in unbalanced {
            differing.insert(hash);
            let copies = balance.unsigned_abs();
            let (count, examples) = if balance > 0 {
                (&mut self.tally.missing, &mut self.tally.missing_examples)
            } else {
                (&mut self.tally.extra, &mut self.tally.extra_examples)
            };
            *count += copies;
            if let Some(row) = self.kept.get(&hash) {
                example(examples, row, copies);
            }
        }
        (self.tally, differing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_missing_extra_differing() {
        let mut c = KeyedComparison::new(None);
        for (key, row) in [(&b"1"[..], &b"1a"[..]), (b"2", b"2b"), (b"3", b"3c")] {
            c.postgres_row(key, row);
        }
        for (key, row) in [(&b"1"[..], &b"1a"[..]), (b"2", b"2X"), (b"4", b"4d")] {
            c.clickhouse_row(key, row);
        }
        let (tally, keys) = c.finish();
        assert_eq!((tally.missing, tally.extra, tally.differing), (1, 1, 1));
        assert_eq!(tally.missing_examples, vec![(b"3".to_vec(), 1)]);
        assert_eq!(tally.extra_examples, vec![(b"4".to_vec(), 1)]);
        assert_eq!(tally.differing_examples, vec![(b"2".to_vec(), 1)]);
        assert_eq!(keys.len(), 3);
        // A recheck limited to keys 2 and 3, where 3 has arrived since: only 2 persists.
        let only: HashSet<Box<[u8]>> = [b"2".as_slice().into(), b"3".as_slice().into()].into();
        let mut again = KeyedComparison::new(Some(only));
        again.postgres_row(b"2", b"2b");
        again.postgres_row(b"3", b"3c");
        again.clickhouse_row(b"2", b"2X");
        again.clickhouse_row(b"3", b"3c");
        again.clickhouse_row(b"4", b"4d");
        let (tally, _) = again.finish();
        assert_eq!((tally.missing, tally.extra, tally.differing), (0, 0, 1));
        assert_eq!((tally.postgres_rows, tally.clickhouse_rows), (2, 3));
    }

    #[test]
    fn multisets_count_copies() {
        let mut c = MultisetComparison::new(None);
        for row in [&b"a"[..], b"a", b"b", b"c"] {
            c.postgres_row(row);
        }
        // ClickHouse: a inserted three times, one deleted; b inserted; d inserted.
        for (row, deleted) in [
            (&b"a"[..], false),
            (b"a", false),
            (b"a", false),
            (b"a", true),
        ] {
            c.clickhouse_row(row, deleted);
        }
        c.clickhouse_row(b"b", false);
        c.clickhouse_row(b"d", false);
        let (tally, differing) = c.finish();
        assert_eq!((tally.missing, tally.extra, tally.differing), (1, 1, 0));
        assert_eq!(tally.clickhouse_rows, 4);
        assert_eq!(differing.len(), 2);
        let mut again = MultisetComparison::new(Some(differing));
        again.postgres_row(b"c");
        again.postgres_row(b"c");
        again.postgres_row(b"a");
        let (tally, _) = again.finish();
        assert_eq!(tally.missing, 2);
        assert_eq!(tally.missing_examples, vec![(b"c".to_vec(), 2)]);
    }
}
