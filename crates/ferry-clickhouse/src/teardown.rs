//! Dropping what Ferry created in ClickHouse for a destination table: its `<table>_current`
//! view, the table, and the `<table>_resync` shadow table a resync loads before swapping it in.

use crate::ddl::{Ident, view_name};
use crate::sink::{Sink, SinkError};

/// Suffix of the shadow table a resync loads (and swaps in with EXCHANGE TABLES).
pub const SHADOW_SUFFIX: &str = "_resync";

/// The statements that drop every object of destination `table` in `database`, view first
/// (it reads the table). Each is idempotent, and `SYNC` so that a table of the same name can
/// be created again at once.
pub fn drop_statements(database: &str, table: &str) -> Vec<String> {
    let db = Ident(database);
    vec![
        format!("DROP VIEW IF EXISTS {db}.{} SYNC", Ident(&view_name(table))),
        format!("DROP TABLE IF EXISTS {db}.{} SYNC", Ident(table)),
        format!(
            "DROP TABLE IF EXISTS {db}.{} SYNC",
            Ident(&format!("{table}{SHADOW_SUFFIX}"))
        ),
    ]
}

impl Sink {
    /// Drops destination `table`, its view and any resync shadow table (see
    /// [`drop_statements`]).
    pub async fn drop_table_objects(&self, table: &str) -> Result<(), SinkError> {
        for sql in drop_statements(self.database(), table) {
            self.client()
                .query(&sql)
                .execute()
                .await
                .map_err(|e| self.classify(&format!("DROP of {table}"), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_then_table_then_shadow() {
        assert_eq!(
            drop_statements("db", "or`ders"),
            vec![
                "DROP VIEW IF EXISTS `db`.`or\\`ders_current` SYNC",
                "DROP TABLE IF EXISTS `db`.`or\\`ders` SYNC",
                "DROP TABLE IF EXISTS `db`.`or\\`ders_resync` SYNC",
            ]
        );
    }
}
