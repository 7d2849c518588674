//! Replica identity: which columns Postgres sends as a row's old key on UPDATE and DELETE, and
//! so which columns key the row in ClickHouse.
//!
//! The row key must be exactly what pgoutput sends: a delete is written as a marker keyed by
//! the old key, and a marker keyed by other columns (zeros, empty strings) deletes nothing.
//! The rules below mirror Postgres's own choice of identity index (relcache.c,
//! `RelationGetIndexList`): only a valid, unique, immediate, non-partial index counts.

use ferry_proto::v1::ReplicaIdentity;
use tokio_postgres::Client;

use crate::SourceError;
use crate::error::query_error;

/// A primary key or replica identity index, as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyIndex {
    /// The index's name, schema-qualified when not on the search path.
    pub(crate) name: String,
    pub(crate) valid: bool,
    pub(crate) unique: bool,
    /// Not DEFERRABLE: uniqueness holds after every row, not only at commit.
    pub(crate) immediate: bool,
    /// Has no WHERE clause.
    pub(crate) whole: bool,
    /// Key columns in key order (INCLUDE columns are not part of the identity): the name, or
    /// `None` for an expression, and whether the column is NOT NULL.
    pub(crate) columns: Vec<(Option<String>, bool)>,
}

impl KeyIndex {
    /// Why the index cannot identify rows, if it cannot: the relcache rule, plus what
    /// `ALTER TABLE … REPLICA IDENTITY USING INDEX` demands of the columns.
    pub(crate) fn problem(&self) -> Option<String> {
        let name = &self.name;
        if !self.valid {
            return Some(format!(
                "index {name} is not valid (a failed CREATE INDEX CONCURRENTLY or REINDEX)"
            ));
        }
        if !self.unique {
            return Some(format!("index {name} is not unique"));
        }
        if !self.immediate {
            return Some(format!("index {name} is DEFERRABLE"));
        }
        if !self.whole {
            return Some(format!("index {name} is partial"));
        }
        if self.columns.iter().any(|(column, _)| column.is_none()) {
            return Some(format!("index {name} is on an expression"));
        }
        if let Some((Some(column), _)) = self.columns.iter().find(|(_, not_null)| !not_null) {
            return Some(format!("column {column} of index {name} is nullable"));
        }
        None
    }

    fn column_names(&self) -> Vec<String> {
        self.columns.iter().filter_map(|(c, _)| c.clone()).collect()
    }
}

/// A table's replica identity setting and the indexes it may rely on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) kind: ReplicaIdentity,
    pub(crate) primary: Option<KeyIndex>,
    /// The index `REPLICA IDENTITY USING INDEX` names (`pg_index.indisreplident`).
    pub(crate) index: Option<KeyIndex>,
}

impl Identity {
    /// The columns that key a row, in key order; empty when there are none.
    ///
    /// DEFAULT: the primary key. USING INDEX: that index. FULL: the primary key when there is
    /// one (the old row carries it), else none (the row is keyed by every column). An index
    /// Postgres does not count (a DEFERRABLE primary key, a dropped identity index) gives no
    /// key: Postgres then sends no old key either. Under FULL a deferrable primary key is not
    /// a key: inside a transaction two rows may share it, and a delete marker of one would
    /// hide the other.
    pub(crate) fn key(&self) -> Vec<String> {
        let usable = |index: &Option<KeyIndex>| {
            index
                .as_ref()
                .filter(|i| i.problem().is_none())
                .map(KeyIndex::column_names)
                .unwrap_or_default()
        };
        match self.kind {
            ReplicaIdentity::Default | ReplicaIdentity::Full => usable(&self.primary),
            ReplicaIdentity::Index => usable(&self.index),
            ReplicaIdentity::Nothing | ReplicaIdentity::Unspecified => Vec::new(),
        }
    }
}

/// Reads the replica identity of the relation `relation_oid` from the catalog.
pub(crate) async fn identity(client: &Client, relation_oid: u32) -> Result<Identity, SourceError> {
    let kind: Option<String> = client
        .query_opt(
            "SELECT relreplident::text FROM pg_class WHERE oid = $1",
            &[&relation_oid],
        )
        .await
        .map_err(query_error("replica identity"))?
        .map(|row| row.get(0));
    let Some(kind) = kind else {
        return Err(SourceError::Catalog {
            detail: format!("relation {relation_oid} does not exist"),
        });
    };
    let kind = match kind.as_str() {
        "d" => ReplicaIdentity::Default,
        "f" => ReplicaIdentity::Full,
        "i" => ReplicaIdentity::Index,
        _ => ReplicaIdentity::Nothing,
    };
    // One row per key column of the primary key and of the identity index (at most one
    // each); a LEFT JOIN so an expression column shows as a NULL name.
    let rows = client
        .query(
            "SELECT i.indexrelid, i.indexrelid::regclass::text, i.indisprimary, i.indisreplident, \
                    i.indisvalid, i.indisunique, i.indimmediate, i.indpred IS NULL, \
                    a.attname::text, coalesce(a.attnotnull, false) \
             FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                  AND k.attnum > 0 \
             WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident) \
                   AND k.ord <= i.indnkeyatts \
             ORDER BY i.indexrelid, k.ord",
            &[&relation_oid],
        )
        .await
        .map_err(query_error("replica identity index"))?;
    let mut identity = Identity {
        kind,
        primary: None,
        index: None,
    };
    let mut current: Option<(u32, bool, bool, KeyIndex)> = None;
    for row in &rows {
        let oid: u32 = row.get(0);
        if current.as_ref().is_none_or(|(o, ..)| *o != oid) {
            if let Some(done) = current.take() {
                identity.place(done);
            }
            current = Some((
                oid,
                row.get(2),
                row.get(3),
                KeyIndex {
                    name: row.get(1),
                    valid: row.get(4),
                    unique: row.get(5),
                    immediate: row.get(6),
                    whole: row.get(7),
                    columns: Vec::new(),
                },
            ));
        }
        if let Some((.., index)) = current.as_mut() {
            index.columns.push((row.get(8), row.get(9)));
        }
    }
    if let Some(done) = current.take() {
        identity.place(done);
    }
    Ok(identity)
}

impl Identity {
    fn place(&mut self, (_, primary, replident, index): (u32, bool, bool, KeyIndex)) {
        if replident {
            self.index = Some(index.clone());
        }
        if primary {
            self.primary = Some(index);
        }
    }
}

/// The replica identity of `relation_oid` and the columns that key its rows, in key order
/// (see [`Identity::key`]): the columns pgoutput sends as the old key of an UPDATE or DELETE
/// (DEFAULT, USING INDEX), or the primary key inside the full old row (FULL). An empty list
/// means rows are keyed by every column (FULL without a primary key) or, for any other kind,
/// that Postgres has no usable identity for the table.
///
/// The CDC worker compares this with the schema Setup recorded to notice a replica identity
/// changed under a running pipe.
pub async fn replica_identity_key(
    client: &Client,
    relation_oid: u32,
) -> Result<(ReplicaIdentity, Vec<String>), SourceError> {
    let identity = identity(client, relation_oid).await?;
    let key = identity.key();
    Ok((identity.kind, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(name: &str, columns: &[&str]) -> KeyIndex {
        KeyIndex {
            name: name.into(),
            valid: true,
            unique: true,
            immediate: true,
            whole: true,
            columns: columns
                .iter()
                .map(|c| (Some((*c).to_owned()), true))
                .collect(),
        }
    }

    #[test]
    fn the_key_is_what_the_identity_sends() {
        let pk = index("t_pkey", &["id"]);
        let code = index("code_idx", &["code"]);
        let of = |kind, primary: Option<&KeyIndex>, index: Option<&KeyIndex>| {
            Identity {
                kind,
                primary: primary.cloned(),
                index: index.cloned(),
            }
            .key()
        };
        assert_eq!(of(ReplicaIdentity::Default, Some(&pk), None), ["id"]);
        assert_eq!(of(ReplicaIdentity::Index, Some(&pk), Some(&code)), ["code"]);
        assert_eq!(of(ReplicaIdentity::Full, Some(&pk), None), ["id"]);
        assert!(of(ReplicaIdentity::Full, None, None).is_empty());
        assert!(of(ReplicaIdentity::Nothing, Some(&pk), None).is_empty());
        // A dropped identity index: Postgres sends nothing, whatever the primary key.
        assert!(of(ReplicaIdentity::Index, Some(&pk), None).is_empty());
        let deferrable = KeyIndex {
            immediate: false,
            ..pk.clone()
        };
        assert!(of(ReplicaIdentity::Default, Some(&deferrable), None).is_empty());
        assert!(of(ReplicaIdentity::Full, Some(&deferrable), None).is_empty());
        assert_eq!(
            deferrable.problem().as_deref(),
            Some("index t_pkey is DEFERRABLE")
        );
        let nullable = KeyIndex {
            columns: vec![(Some("code".into()), false)],
            ..code.clone()
        };
        assert_eq!(
            nullable.problem().as_deref(),
            Some("column code of index code_idx is nullable")
        );
    }
}
