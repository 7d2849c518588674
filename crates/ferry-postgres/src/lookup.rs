//! Reading rows back from the source by key: the values an UPDATE left out (unchanged TOAST
//! values) when no other copy of them exists, and what a column's missing value is.
//!
//! Values come back as their output-function text, exactly as pgoutput's text mode prints
//! them (the simple query protocol returns text, and every Ferry session pins the same
//! settings), so they go through the same transcoding as streamed values.

use std::collections::HashMap;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::SourceError;
use crate::error::{query_error, quoted_table};

/// A row key as the text of each key column, in key order.
pub type KeyText = Vec<String>;

/// A key column: its name and its declared type (`format_type`, e.g. `integer`).
#[derive(Debug, Clone)]
pub struct KeyColumn<'a> {
    /// Column name.
    pub name: &'a str,
    /// Declared type, as Setup recorded it.
    pub type_name: &'a str,
}

/// The current text of `columns` of the rows of `table` (schema.table) whose key is in
/// `keys`, by key. Keys without a row are absent from the answer.
pub async fn current_rows(
    client: &Client,
    table: &str,
    key: &[KeyColumn<'_>],
    columns: &[&str],
    keys: &[KeyText],
) -> Result<HashMap<KeyText, Vec<Option<String>>>, SourceError> {
    let mut found = HashMap::with_capacity(keys.len());
    if keys.is_empty() || key.is_empty() {
        return Ok(found);
    }
    // One array literal per key column, cast to the column's type, zipped by unnest: the key
    // index is used, and no value is ever spliced into the SQL unquoted.
    let arrays: Vec<String> = key
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let elements: Vec<String> = keys
                .iter()
                .map(|k| array_element(k.get(i).map_or("", String::as_str)))
                .collect();
            format!(
                "{}::text[]::{}[]",
                literal(&format!("{{{}}}", elements.join(","))),
                column.type_name
            )
        })
        .collect();
    let key_names: Vec<String> = key.iter().map(|c| ident(c.name)).collect();
    let select: Vec<String> = key_names
        .iter()
        .chain(columns.iter().map(|c| ident(c)).collect::<Vec<_>>().iter())
        .cloned()
        .collect();
    let sql = format!(
        "SELECT {} FROM {} WHERE ({}) IN (SELECT * FROM unnest({}))",
        select.join(", "),
        quoted_table(table),
        key_names.join(", "),
        arrays.join(", ")
    );
    let messages = client
        .simple_query(&sql)
        .await
        .map_err(query_error("row lookup"))?;
    for message in messages {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let key_text: KeyText = (0..key.len())
            .map(|i| row.get(i).unwrap_or_default().to_owned())
            .collect();
        let values = (key.len()..key.len() + columns.len())
            .map(|i| row.get(i).map(str::to_owned))
            .collect();
        found.insert(key_text, values);
    }
    Ok(found)
}

/// The value rows that predate an added column have for it (`attmissingval`), as text.
pub async fn missing_value(
    client: &Client,
    relation: u32,
    column: &str,
) -> Result<Option<String>, SourceError> {
    let row = client
        .query_opt(
            "SELECT (attmissingval::text::text[])[1] FROM pg_attribute \
             WHERE attrelid = $1 AND attname = $2 AND atthasmissing",
            &[&relation, &column],
        )
        .await
        .map_err(query_error("missing value"))?;
    Ok(row.and_then(|r| r.get::<_, Option<String>>(0)))
}

/// A string literal (standard_conforming_strings: only quotes are doubled).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// An identifier, double-quoted.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An element of a text array literal: always quoted, so spaces, commas, braces and the word
/// NULL stay data.
fn array_element(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_quote_everything() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(array_element(r#"a "b" \c"#), r#""a \"b\" \\c""#);
        assert_eq!(array_element("NULL"), "\"NULL\"");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
    }
}
