//! Names Ferry checks or derives: pipe names, and the Postgres objects named after a pipe.

/// Longest pipe name: `ferry_<name>` must fit Postgres's 63-byte identifier limit with room left.
pub const MAX_PIPE_NAME_LEN: usize = 48;

/// Checks a pipe name: lower-case ASCII letters, digits and `_`, starting with a letter.
///
/// The name becomes part of etcd keys, replication slot and publication names, so it is held
/// to the strictest of those alphabets (a slot name allows only `[a-z0-9_]`).
pub fn check_pipe_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_PIPE_NAME_LEN {
        return Err(format!(
            "must be at most {MAX_PIPE_NAME_LEN} characters, got {}",
            name.len()
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!("must start with a lower-case letter, got {name:?}"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
    {
        return Err(format!(
            "may contain only a-z, 0-9 and '_', found {bad:?} in {name:?}"
        ));
    }
    Ok(())
}

/// Checks a Postgres or ClickHouse identifier as Ferry accepts it: non-empty, at most 63 bytes,
/// no dots (a dot would make `schema.table` ambiguous), no slashes (a table's etcd keys are
/// paths under its name: `a` would be a prefix of `a/b`), no control characters.
pub fn check_identifier(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > 63 {
        return Err(format!("must be at most 63 bytes, got {}", value.len()));
    }
    if value.contains('.') {
        return Err(format!("must not contain '.', got {value:?}"));
    }
    if value.contains('/') {
        return Err(format!("must not contain '/', got {value:?}"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "must not contain control characters, got {value:?}"
        ));
    }
    Ok(())
}

/// The replication slot and the publication Ferry creates for a pipe when the spec names none.
pub fn default_slot_and_publication(pipe: &str) -> String {
    format!("ferry_{pipe}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_names() {
        assert!(check_pipe_name("orders_2024").is_ok());
        assert!(check_pipe_name(&"a".repeat(MAX_PIPE_NAME_LEN)).is_ok());
        for bad in ["", "Orders", "1abc", "a-b", "a.b", "a b", "é", "_x"] {
            assert!(check_pipe_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_pipe_name(&"a".repeat(MAX_PIPE_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn identifiers() {
        assert!(check_identifier("Order Items").is_ok());
        for bad in ["", "a.b", "a\nb", "a/b"] {
            assert!(check_identifier(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_identifier(&"x".repeat(64)).is_err());
    }
}
