//! What a reload in progress (the pipe status's `reload`) asks of the stream: hold its
//! checkpoint and leave the reloaded tables alone while the coordinator prepares or swaps
//! them, or write their changes from the reload's boundary on into their new table while
//! snapshot workers copy them. See docs/reload.md.

use ferry_postgres::snapshot::Visibility;
use ferry_proto::v1::{ReloadKind, ReloadPhase, TableReload};
use ferry_store::PipeRecord;

/// The reload of a pipe as the stream sees it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reload(Option<TableReload>);

/// What the stream does with one reloaded table.
#[derive(Debug, Clone)]
pub(crate) enum ReloadedTable {
    /// Not written at all (the coordinator prepares or swaps it).
    Held,
    /// Changes committed at or after `start_lsn` are written, into the shadow table when
    /// `shadow`; a keyless table skips those `visibility` already holds.
    Copying {
        start_lsn: u64,
        visibility: Option<Visibility>,
        shadow: bool,
    },
}

impl Reload {
    pub(crate) fn of(record: &PipeRecord) -> Self {
        Self(record.status.reload.clone())
    }

    /// The reload's generation and phase (a change of either restarts the stream).
    pub(crate) fn key(&self) -> Option<(u64, ReloadPhase)> {
        self.0.as_ref().map(|r| (r.generation, r.phase()))
    }

    /// The reload copying its tables, as a TRUNCATE of one of them needs it.
    pub(crate) fn copy(&self) -> Option<crate::table::ReloadCopy> {
        self.0.as_ref().map(|r| crate::table::ReloadCopy {
            generation: r.generation,
            visibility: Visibility::parse(&r.visibility),
        })
    }

    /// Whether the stream must hold its checkpoint and acknowledge it.
    pub(crate) fn holding(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|r| matches!(r.phase(), ReloadPhase::Holding | ReloadPhase::Swapping))
    }

    /// What to do with `table` (schema.table); `None` if the reload does not concern it.
    pub(crate) fn table(&self, table: &str) -> Option<ReloadedTable> {
        let reload = self.0.as_ref()?;
        if reload.kind() == ReloadKind::Remove || !reload.tables.iter().any(|t| t == table) {
            return None;
        }
        Some(match reload.phase() {
            ReloadPhase::Copying if reload.start_lsn > 0 => ReloadedTable::Copying {
                start_lsn: reload.start_lsn,
                visibility: Visibility::parse(&reload.visibility),
                shadow: reload.kind() == ReloadKind::Resync,
            },
            _ => ReloadedTable::Held,
        })
    }
}
