//! Resync's destination side: a shadow table `<table>_resync` is loaded while the live table
//! stays readable, then swapped in with one `EXCHANGE TABLES` (readers never see the table
//! missing) and the old rows dropped.
//!
//! The swap is idempotent across crashes: the shadow is created with a comment naming the
//! reload (pipe and generation), so a swap run again after the exchange finds the comment on
//! the live table and only finishes dropping the old rows, instead of exchanging them back.

use ferry_proto::v1::TableSchema;

use crate::ddl::{self, Ident};
use crate::sink::{Sink, SinkError};
use crate::types::MappingOptions;

/// The shadow table a resync loads `table` into.
pub fn shadow_name(table: &str) -> String {
    format!("{table}{}", crate::teardown::SHADOW_SUFFIX)
}

/// How every shadow's comment starts.
const MARKER_PREFIX: &str = "ferry resync of pipe ";

/// The comment that marks the shadow of a reload.
pub fn marker(pipe: &str, generation: u64) -> String {
    format!("{MARKER_PREFIX}{pipe}, generation {generation}")
}

impl Sink {
    /// Creates the empty shadow of `table` for `schema` (dropping a leftover one), marked
    /// with `marker`.
    pub async fn create_shadow(
        &self,
        table: &str,
        schema: &TableSchema,
        options: MappingOptions,
        marker: &str,
    ) -> Result<(), SinkError> {
        let shadow = shadow_name(table);
        // A leftover of an earlier resync is replaced; a table of someone else's is not.
        if let Some(comment) = self.table_comment(&shadow).await?
            && !comment.starts_with(MARKER_PREFIX)
        {
            return Err(SinkError::ShadowTaken {
                table: format!("{}.{shadow}", self.database()),
            });
        }
        self.drop_table(&shadow).await?;
        let sql = ddl::create_table(self.database(), &shadow, schema, options)?;
        let sql = format!(
            "{sql} COMMENT '{}'",
            marker.replace('\\', "\\\\").replace('\'', "\\'")
        );
        self.execute(&format!("CREATE TABLE {shadow}"), &sql).await
    }

    /// Swaps the loaded shadow of `table` in: `EXCHANGE TABLES` when `table` exists (a rename
    /// when it does not), then drops the old rows. Safe to run again after a crash.
    pub async fn swap_in(&self, table: &str, marker: &str) -> Result<(), SinkError> {
        let shadow = shadow_name(table);
        let live = self.table_comment(table).await?;
        if live.as_deref() != Some(marker) {
            if self.table_comment(&shadow).await?.as_deref() != Some(marker) {
                return Err(SinkError::ShadowMissing {
                    table: format!("{}.{shadow}", self.database()),
                });
            }
            let sql = if live.is_some() {
                format!(
                    "EXCHANGE TABLES {db}.{} AND {db}.{}",
                    Ident(table),
                    Ident(&shadow),
                    db = Ident(self.database())
                )
            } else {
                format!(
                    "RENAME TABLE {db}.{} TO {db}.{}",
                    Ident(&shadow),
                    Ident(table),
                    db = Ident(self.database())
                )
            };
            self.execute("EXCHANGE TABLES", &sql).await?;
        }
        self.drop_table(&shadow).await
    }

    /// Checks that the database can swap tables atomically: `EXCHANGE TABLES` needs the
    /// Atomic engine (ClickHouse's default since 20.10) or Replicated.
    pub async fn check_exchange(&self) -> Result<(), SinkError> {
        let engine = self
            .client()
            .query("SELECT engine FROM system.databases WHERE name = ?")
            .bind(self.database())
            .fetch_all::<String>()
            .await
            .map_err(|e| self.classify("database lookup", e))?
            .into_iter()
            .next()
            .unwrap_or_default();
        if matches!(engine.as_str(), "Atomic" | "Replicated") {
            Ok(())
        } else {
            Err(SinkError::NoExchange {
                database: self.database().to_owned(),
                engine,
            })
        }
    }

    /// Drops `table` if it exists.
    pub async fn drop_table(&self, table: &str) -> Result<(), SinkError> {
        let sql = format!(
            "DROP TABLE IF EXISTS {}.{}",
            Ident(self.database()),
            Ident(table)
        );
        self.execute(&format!("DROP TABLE {table}"), &sql).await
    }

    /// Drops view `view` if it exists.
    pub async fn drop_view(&self, view: &str) -> Result<(), SinkError> {
        let sql = format!(
            "DROP VIEW IF EXISTS {}.{}",
            Ident(self.database()),
            Ident(view)
        );
        self.execute(&format!("DROP VIEW {view}"), &sql).await
    }

    /// Whether `table` exists.
    pub async fn table_exists(&self, table: &str) -> Result<bool, SinkError> {
        Ok(self.table_comment(table).await?.is_some())
    }

    /// The comment of `table`, or `None` if it does not exist.
    async fn table_comment(&self, table: &str) -> Result<Option<String>, SinkError> {
        let found = self
            .client()
            .query("SELECT comment FROM system.tables WHERE database = ? AND name = ?")
            .bind(self.database())
            .bind(table)
            .fetch_all::<String>()
            .await
            .map_err(|e| self.classify("table lookup", e))?;
        Ok(found.into_iter().next())
    }
}
