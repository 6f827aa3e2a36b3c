//! sqlx's errors as ticketrail's one [`Error`], by sqlx's own variants.

use ticketrail_core::{Error, ErrorKind};

/// Turns a sqlx error met while `doing` something into an [`Error`] whose
/// kind says whether trying again may help: a lost or refused connection
/// ([`ErrorKind::Connection`]), a pool that timed out
/// ([`ErrorKind::Timeout`]) or closed ([`ErrorKind::Closed`]); anything
/// the database itself refused is [`ErrorKind::Database`].
pub(crate) fn database(doing: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
    move |e| {
        let kind = match &e {
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => {
                ErrorKind::Connection
            }
            sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
            sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => ErrorKind::Closed,
            sqlx::Error::Configuration(_) => ErrorKind::Config,
            sqlx::Error::Database(db) if is_connection_class(db.code().as_deref()) => {
                ErrorKind::Connection
            }
            _ => ErrorKind::Database,
        };
        Error::new(kind, format!("PostgreSQL: {doing}")).with_source(e)
    }
}

/// SQLSTATE classes that say the server went away or is not ready rather
/// than that the statement was wrong: 08 (connection exception), 57P
/// (operator intervention: shutdown, crash, cannot connect now).
fn is_connection_class(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.starts_with("08") || c.starts_with("57P"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_sqlx_variants_and_sqlstate() {
        let io = database("relaying")(sqlx::Error::Io(std::io::Error::other("reset")));
        assert_eq!(io.kind(), ErrorKind::Connection);
        assert!(io.to_string().contains("PostgreSQL: relaying"), "{io}");
        assert_eq!(
            database("x")(sqlx::Error::PoolTimedOut).kind(),
            ErrorKind::Timeout
        );
        assert_eq!(
            database("x")(sqlx::Error::RowNotFound).kind(),
            ErrorKind::Database
        );
        assert!(is_connection_class(Some("57P01")));
        assert!(is_connection_class(Some("08006")));
        assert!(!is_connection_class(Some("23505")));
        assert!(!is_connection_class(None));
    }
}
