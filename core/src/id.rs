//! Message ids: random UUIDs from the operating system's generator, drawn a
//! few thousand bytes at a time so a publish costs no system call.

use std::cell::RefCell;

const POOL: usize = 4096;

struct Pool {
    bytes: [u8; POOL],
    used: usize,
}

thread_local! {
    static RANDOM: RefCell<Pool> = const { RefCell::new(Pool { bytes: [0; POOL], used: POOL }) };
}

fn random_16() -> [u8; 16] {
    RANDOM.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.used + 16 > POOL {
            if getrandom::fill(&mut pool.bytes).is_err() {
                return *uuid::Uuid::new_v4().as_bytes();
            }
            pool.used = 0;
        }
        let start = pool.used;
        pool.used += 16;
        pool.bytes[start..start + 16].try_into().expect("16 bytes")
    })
}

/// A fresh message id: a random (version 4) UUID, hyphenated, lower case.
///
/// ```
/// let a = ticketrail_core::new_message_id();
/// let b = ticketrail_core::new_message_id();
/// assert_eq!(a.len(), 36);
/// assert_ne!(a, b);
/// ```
pub fn new_message_id() -> String {
    let uuid = uuid::Builder::from_random_bytes(random_16()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid.hyphenated().encode_lower(&mut text).to_owned()
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
