//! `_ferry_version`: the order in which ReplacingMergeTree keeps row versions (DESIGN.md §3,
//! invariant 4).
//!
//! A version is a `UInt128` that follows **commit order**: the commit LSN of the transaction
//! that made the change (pgoutput's Begin carries it) in the high 64 bits, and the row's
//! position among the rows that transaction wrote in the low 64 bits. A change's own LSN is
//! not enough: a transaction can write a row's heap tuple before another transaction that
//! commits earlier, and must still win. Replaying a transaction yields the same versions, so a
//! replay collapses onto the rows it repeats.
//!
//! Snapshot rows sort below every change: they have no commit LSN (high half 0). Rows of a
//! keyed table carry 0; rows of a keyless table carry their physical position in the snapshot
//! (relation, block, offset), because a keyless table is a multiset and two identical rows
//! must stay two rows.
//!
//! To read a table as of a checkpoint LSN `L`, keep the rows whose version is at most
//! [`upto`]`(L)`: every transaction that committed at or before `L`.

/// The version of the `seq`-th row (1-based) written by the transaction committed at
/// `commit_lsn`.
pub fn change(commit_lsn: u64, seq: u64) -> u128 {
    (u128::from(commit_lsn) << 64) | u128::from(seq)
}

/// The version of a keyless table's snapshot row at `ctid` (`block`, `offset`) of the table's
/// `relation`-th relation (leaf partitions of a partitioned table are numbered in plan order).
/// Unique within the table's snapshot and below every change version.
pub fn snapshot_row(relation: u16, block: u32, offset: u16) -> u128 {
    (u128::from(relation) << 48) | (u128::from(block) << 16) | u128::from(offset)
}

/// The highest version of a transaction that committed at or before `lsn`.
pub fn upto(lsn: u64) -> u128 {
    change(lsn, u64::MAX)
}

/// The commit LSN a version carries (0 for a snapshot row).
pub fn commit_lsn(version: u128) -> u64 {
    // The shift leaves 64 significant bits.
    (version >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_order_beats_change_order() {
        // T1 writes at LSN 100 and commits at 500; T2 writes at 200 and commits at 400:
        // every row of T2 sorts below every row of T1.
        assert!(change(400, 1_000_000) < change(500, 1));
        assert!(change(500, 1) < change(500, 2));
        assert_eq!(commit_lsn(change(500, 7)), 500);
    }

    #[test]
    fn snapshot_rows_sort_below_every_change() {
        let highest = snapshot_row(u16::MAX, u32::MAX, u16::MAX);
        assert!(highest < change(1, 0));
        assert_ne!(snapshot_row(0, 1, 2), snapshot_row(0, 2, 1));
        assert_ne!(snapshot_row(1, 0, 1), snapshot_row(0, 0, 1));
        assert!(upto(500) < change(501, 0) && upto(500) >= change(500, u64::MAX));
    }
}
