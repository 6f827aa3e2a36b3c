//! Message ids: random (version 4) UUIDs from a generator seeded by the
//! operating system and kept per thread (uuid's `fast-rng`, a ChaCha
//! generator from `rand`), so a publish costs no system call.
//!
//! The generator reseeds itself every 4,096 ids, not on `fork`: a child
//! forked from a thread that made ids makes the same ones as its parent
//! until then (as with the pool of system randomness used before). Fork
//! before publishing, or not at all, as a tokio program would anyway.

/// A fresh message id: a random (version 4) UUID, hyphenated, lower case.
///
/// ```
/// let a = ticketrail_core::new_message_id();
/// let b = ticketrail_core::new_message_id();
/// assert_eq!(a.len(), 36);
/// assert_ne!(a, b);
/// ```
pub fn new_message_id() -> String {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v4()
        .hyphenated()
        .encode_lower(&mut text)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_version_4_and_unique() {
        let ids: HashSet<String> = (0..10_000).map(|_| new_message_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            let parsed = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(parsed.get_version_num(), 4);
        }
    }
}
