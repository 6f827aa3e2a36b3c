//! Where ticketrail's tables live: an optional schema and a name prefix.

use ticketrail_core::{Error, Result};

/// The longest schema or prefix accepted: PostgreSQL cuts identifiers at 63
/// bytes, and the longest table name adds 16 to the prefix.
const MAX_PART_LEN: usize = 40;

/// The names of ticketrail's tables, functions and notification channel in
/// one database: `outbox`, `inbox` and `migrations`, each after an optional
/// prefix, in an optional schema (else the connection's `search_path`).
///
/// ```
/// use ticketrail_postgres::Tables;
///
/// let tables = Tables::default().schema("jobs")?.prefix("tr_")?;
/// assert_eq!(tables.outbox(), r#""jobs"."tr_outbox""#);
/// # Ok::<(), ticketrail_core::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    schema: Option<String>,
    prefix: String,
}

impl Tables {
    /// Puts the tables in `schema` (created by the migration if missing).
    /// Lower-case letters, digits and `_`, starting with a letter or `_`.
    pub fn schema(mut self, schema: &str) -> Result<Self> {
        check_part("schema", schema, false)?;
        self.schema = Some(schema.to_owned());
        Ok(self)
    }

    /// Starts every table name with `prefix` (`tr_` gives `tr_outbox`).
    /// Lower-case letters, digits and `_`.
    pub fn prefix(mut self, prefix: &str) -> Result<Self> {
        check_part("prefix", prefix, true)?;
        self.prefix = prefix.to_owned();
        Ok(self)
    }

    /// The schema, if one is set.
    pub fn schema_name(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// `name` after the prefix, quoted and qualified by the schema.
    fn qualified(&self, name: &str) -> String {
        match &self.schema {
            Some(schema) => format!(r#""{schema}"."{}{name}""#, self.prefix),
            None => format!(r#""{}{name}""#, self.prefix),
        }
    }

    /// The outbox table.
    pub fn outbox(&self) -> String {
        self.qualified("outbox")
    }

    /// The inbox table.
    pub fn inbox(&self) -> String {
        self.qualified("inbox")
    }

    /// The table recording which migrations ran.
    pub fn migrations(&self) -> String {
        self.qualified("migrations")
    }

    /// The trigger function that notifies relays of new outbox rows.
    pub(crate) fn notify_function(&self) -> String {
        self.qualified("outbox_notify")
    }

    /// An index or trigger name (unqualified: PostgreSQL puts an index in
    /// its table's schema).
    pub(crate) fn local(&self, name: &str) -> String {
        format!(r#""{}{name}""#, self.prefix)
    }

    /// The LISTEN/NOTIFY channel that wakes relays, one per outbox table.
    pub fn channel(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}_{}outbox", self.prefix),
            None => format!("{}outbox", self.prefix),
        }
    }

    /// A number naming this outbox for `pg_advisory_xact_lock`, so that
    /// two migrations of the same tables run one after the other.
    pub(crate) fn lock_key(&self) -> i64 {
        // FNV-1a: stable across processes and Rust versions.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.outbox().bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash as i64
    }
}

fn check_part(what: &str, value: &str, may_be_empty: bool) -> Result<()> {
    let bad = |why: &str| Err(Error::config(format!("invalid {what} `{value}`: {why}")));
    if value.is_empty() {
        return if may_be_empty {
            Ok(())
        } else {
            bad("it is empty")
        };
    }
    if value.len() > MAX_PART_LEN {
        return bad(&format!("longer than {MAX_PART_LEN} bytes"));
    }
    if value.starts_with(|c: char| c.is_ascii_digit()) {
        return bad("it starts with a digit");
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
    {
        return bad(&format!(
            "`{c}` is not allowed (lower-case letters, digits and `_` only)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_prefixed_and_qualified() {
        let plain = Tables::default();
        assert_eq!(plain.outbox(), r#""outbox""#);
        assert_eq!(plain.channel(), "outbox");
        let t = Tables::default()
            .schema("jobs")
            .unwrap()
            .prefix("tr_")
            .unwrap();
        assert_eq!(t.inbox(), r#""jobs"."tr_inbox""#);
        assert_eq!(t.local("outbox_pending"), r#""tr_outbox_pending""#);
        assert_eq!(t.channel(), "jobs_tr_outbox");
        assert_ne!(t.lock_key(), plain.lock_key());
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        for (schema, why) in [
            ("", "empty"),
            ("Jobs", "`J` is not allowed"),
            ("a\"b", "`\"` is not allowed"),
            ("1abc", "starts with a digit"),
        ] {
            let e = Tables::default().schema(schema).unwrap_err();
            assert!(e.to_string().contains(why), "{schema:?}: {e}");
        }
        assert!(Tables::default().prefix("").is_ok());
        assert!(Tables::default().prefix(&"x".repeat(41)).is_err());
    }
}
