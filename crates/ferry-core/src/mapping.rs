//! The users' choices of how values map to ClickHouse: column types
//! (`TableMapping.column_types`), the type of unconstrained numerics, and what happens to
//! numerics a Decimal cannot hold. All are fixed when a pipe is created.
//!
//! Only the spelling of column types is checked here (pure): whether the column exists and its
//! Postgres type can take the chosen type is for Setup, which sees the source, as is whether
//! the server has the JSON type.

use std::collections::HashMap;

use ferry_proto::v1::{OutOfRange, PipeSettings, UnconstrainedNumeric};

/// Largest precision ClickHouse's Decimal takes.
const MAX_DECIMAL_PRECISION: u32 = 76;

/// The canonical spelling of a supported type (`String`, `JSON`, `Decimal(P, S)`), or why it
/// is not one.
pub fn canonical_type(text: &str) -> Result<String, String> {
    let unsupported = || {
        format!(
            "{text:?} is not a supported column type; use \"String\" (any column), \
             \"Decimal(P, S)\" with 1 <= P <= {MAX_DECIMAL_PRECISION} and 0 <= S <= P (numeric), \
             or \"JSON\" (json, jsonb)"
        )
    };
    match text.trim() {
        "String" => return Ok("String".into()),
        "JSON" => return Ok("JSON".into()),
        _ => {}
    }
    let inner = text
        .trim()
        .strip_prefix("Decimal(")
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(unsupported)?;
    let (p, s) = inner.split_once(',').ok_or_else(unsupported)?;
    let (Ok(precision), Ok(scale)) = (p.trim().parse::<u32>(), s.trim().parse::<u32>()) else {
        return Err(unsupported());
    };
    if !(1..=MAX_DECIMAL_PRECISION).contains(&precision) || scale > precision {
        return Err(unsupported());
    }
    Ok(format!("Decimal({precision}, {scale})"))
}

/// Checks and canonicalises `types` in place; returns (field, description) per problem, the
/// field being `<at>.column_types[<column>]`.
pub(crate) fn check_column_types(
    types: &mut HashMap<String, String>,
    at: &str,
) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    for (column, ty) in types.iter_mut() {
        let field = format!("{at}.column_types[{column}]");
        if column.is_empty() {
            problems.push((field, "the column name must not be empty".into()));
            continue;
        }
        match canonical_type(ty) {
            Ok(canonical) => *ty = canonical,
            Err(description) => problems.push((field, description)),
        }
    }
    problems.sort();
    problems
}

/// The settings only a new pipe takes: validated, defaults filled in.
pub(crate) fn creation_settings(
    merged: &mut PipeSettings,
    given: &PipeSettings,
) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    match UnconstrainedNumeric::try_from(given.unconstrained_numeric) {
        Ok(UnconstrainedNumeric::Unspecified) => {
            merged.unconstrained_numeric = UnconstrainedNumeric::Decimal7638.into();
        }
        Ok(chosen) => merged.unconstrained_numeric = chosen.into(),
        Err(_) => problems.push((
            "spec.settings.unconstrained_numeric".into(),
            format!(
                "unknown value {}; use UNCONSTRAINED_NUMERIC_DECIMAL_76_38 or UNCONSTRAINED_NUMERIC_STRING",
                given.unconstrained_numeric
            ),
        )),
    }
    match OutOfRange::try_from(given.out_of_range) {
        Ok(OutOfRange::Unspecified) => merged.out_of_range = OutOfRange::Fail.into(),
        Ok(chosen) => merged.out_of_range = chosen.into(),
        Err(_) => problems.push((
            "spec.settings.out_of_range".into(),
            format!(
                "unknown value {}; use OUT_OF_RANGE_FAIL, OUT_OF_RANGE_CLAMP or OUT_OF_RANGE_NULL",
                given.out_of_range
            ),
        )),
    }
    problems
}

/// Problems with a settings update: the settings fixed at creation cannot change.
pub(crate) fn fixed_settings(update: &PipeSettings) -> Vec<(String, String)> {
    // These decide destination column types and what the stream writes; a live change
    // would mix both in one table.
    [
        ("unconstrained_numeric", update.unconstrained_numeric != 0),
        ("out_of_range", update.out_of_range != 0),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(name, _)| {
        (
            format!("settings.{name}"),
            "is fixed when the pipe is created; to change it, recreate the pipe \
             (`ferry delete`, then `ferry create`)"
                .into(),
        )
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!(canonical_type("String").unwrap(), "String");
        assert_eq!(canonical_type(" JSON ").unwrap(), "JSON");
        assert_eq!(canonical_type("Decimal(20,4)").unwrap(), "Decimal(20, 4)");
        for bad in [
            "Int64",
            "string",
            "Decimal(77, 0)",
            "Decimal(4, 5)",
            "Decimal(x, 1)",
            "",
        ] {
            assert!(canonical_type(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn problems_name_the_field() {
        let mut types = HashMap::from([
            ("amount".to_owned(), "Decimal(10,2)".to_owned()),
            ("n".to_owned(), "Float64".to_owned()),
        ]);
        let problems = check_column_types(&mut types, "spec.tables[0]");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "spec.tables[0].column_types[n]");
        assert_eq!(types["amount"], "Decimal(10, 2)");
    }

    /// The spec-level rules: column types checked with the field path, creation-only
    /// settings defaulted, and refused in a settings update.
    #[test]
    fn spec_rules() {
        use ferry_proto::v1::{
            ClickHouseDestination, OutOfRange, PipeSettings, PipeSpec, PostgresSource,
            TableMapping, UnconstrainedNumeric,
        };

        use crate::spec::{apply_settings_update, normalize_new_pipe};

        let spec = |types: &[(&str, &str)]| PipeSpec {
            name: "p".into(),
            source: Some(PostgresSource {
                host: "db".into(),
                database: "app".into(),
                user: "u".into(),
                ..Default::default()
            }),
            destination: Some(ClickHouseDestination {
                url: "http://ch:8123".into(),
                ..Default::default()
            }),
            tables: vec![TableMapping {
                source_table: "orders".into(),
                column_types: types
                    .iter()
                    .map(|(c, t)| ((*c).to_owned(), (*t).to_owned()))
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let ok = normalize_new_pipe(spec(&[("total", "Decimal(12,2)")])).unwrap();
        assert_eq!(ok.tables[0].column_types["total"], "Decimal(12, 2)");
        let settings = ok.settings.unwrap_or_default();
        assert_eq!(
            settings.unconstrained_numeric(),
            UnconstrainedNumeric::Decimal7638
        );
        assert_eq!(settings.out_of_range(), OutOfRange::Fail);
        let bad = normalize_new_pipe(spec(&[("total", "UInt8")])).unwrap_err();
        assert_eq!(
            bad.violations[0].field,
            "spec.tables[0].column_types[total]"
        );

        let update = PipeSettings {
            out_of_range: OutOfRange::Clamp.into(),
            ..Default::default()
        };
        let refused = apply_settings_update(&settings, &update).unwrap_err();
        assert_eq!(refused.violations[0].field, "settings.out_of_range");
        assert!(refused.violations[0].description.contains("ferry delete"));
    }
}
