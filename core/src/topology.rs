//! Topology: a topic space, the queues bound to it, and the rules for names
//! and patterns (C16).

use crate::error::{Error, Result};

/// The longest name any backend accepts (AMQP short strings).
pub const MAX_NAME_LEN: usize = 255;

/// Everything a backend declares for one topic space: the space itself and
/// the work queues bound to it, with their retry and dead-letter plumbing.
///
/// Declaring is idempotent: declaring the same topology again changes nothing.
///
/// ```
/// use ticketrail_core::{QueueSpec, Topology};
///
/// let topology = Topology::new("app.events")
///     .queue(QueueSpec::new("email.notifications").bind("user.#"));
/// assert!(topology.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The topic space (an exchange on RabbitMQ, a stream on NATS).
    pub topic_space: String,
    /// The work queues bound to the topic space.
    pub queues: Vec<QueueSpec>,
}

impl Topology {
    /// A topic space with no queues yet.
    pub fn new(topic_space: impl Into<String>) -> Self {
        Topology {
            topic_space: topic_space.into(),
            queues: Vec::new(),
        }
    }

    /// Adds a work queue.
    pub fn queue(mut self, queue: QueueSpec) -> Self {
        self.queues.push(queue);
        self
    }

    /// Checks every name and pattern, naming the first one that is wrong.
    pub fn validate(&self) -> Result<()> {
        validate_name("topic space", &self.topic_space)?;
        for queue in &self.queues {
            validate_name("queue", &queue.name)?;
            if queue.delivery_limit == 0 {
                return Err(Error::config(format!(
                    "queue `{}`: delivery limit must be at least 1",
                    queue.name
                )));
            }
            for pattern in &queue.bindings {
                validate_pattern(pattern).map_err(|e| {
                    Error::invalid_name(format!("queue `{}`: {}", queue.name, e.message()))
                })?;
            }
        }
        Ok(())
    }
}

/// What a broker already has of one object a [`Topology`] would declare
/// (see [`Broker::inspect`](crate::Broker::inspect)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Finding {
    /// The object, as the broker calls it: `exchange app.events`,
    /// `queue email.notifications`, `stream APP_EVENTS`.
    pub object: String,
    /// Whether the broker has it as ticketrail would declare it.
    pub status: FindingStatus,
    /// What the broker said, and what to do about a difference.
    pub detail: String,
}

impl Finding {
    /// A finding about `object`.
    pub fn new(
        object: impl Into<String>,
        status: FindingStatus,
        detail: impl Into<String>,
    ) -> Self {
        Finding {
            object: object.into(),
            status,
            detail: detail.into(),
        }
    }
}

/// The verdict on one object of a topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FindingStatus {
    /// There, as ticketrail would declare it.
    Matches,
    /// Not there: declaring the topology creates it.
    Missing,
    /// There, but not as ticketrail would declare it: declaring fails (or
    /// would not give ticketrail's guarantees) until it is migrated.
    Differs,
    /// The broker's protocol cannot tell (AMQP cannot list bindings);
    /// declaring makes sure of it, idempotently.
    Unknown,
}

impl FindingStatus {
    /// `matches`, `missing`, `differs`, `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingStatus::Matches => "matches",
            FindingStatus::Missing => "missing",
            FindingStatus::Differs => "differs",
            FindingStatus::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for FindingStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A work queue: its name, the patterns that bind it to the topic space, and
/// the broker-side backstop for messages that crash their consumer (C13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Queue name, e.g. `email.notifications`.
    pub name: String,
    /// Binding patterns (C16): words split by `.`, `*` one word, `#` zero or more.
    pub bindings: Vec<String>,
    /// How many times the broker delivers again a message that came back
    /// unsettled (its consumer died, or nacked it) before it dead-letters it
    /// with reason `delivery-limit` (C13). The count starts afresh when a
    /// message re-enters the queue after a delayed retry. Default 5.
    pub delivery_limit: u32,
}

impl QueueSpec {
    /// The default [`delivery_limit`](QueueSpec::delivery_limit).
    pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

    /// A queue with no bindings and the default delivery limit.
    pub fn new(name: impl Into<String>) -> Self {
        QueueSpec {
            name: name.into(),
            bindings: Vec::new(),
            delivery_limit: Self::DEFAULT_DELIVERY_LIMIT,
        }
    }

    /// Binds the queue to a pattern of the topic space.
    pub fn bind(mut self, pattern: impl Into<String>) -> Self {
        self.bindings.push(pattern.into());
        self
    }

    /// Sets the [`delivery_limit`](QueueSpec::delivery_limit).
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit;
        self
    }
}

/// Checks a queue or topic-space name: not empty, at most 255 bytes, no
/// whitespace or control characters, no wildcards (`*`, `#`, `>`).
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    if is_plain_dotted(name) {
        return Ok(());
    }
    if name.is_empty() {
        return Err(Error::invalid_name(format!("{what} name is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid_name(format!(
            "{what} name `{}…` is {} bytes long; the limit is {MAX_NAME_LEN}",
            truncate(name, 40),
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '*' | '#' | '>'))
    {
        return Err(Error::invalid_name(format!(
            "{what} name `{name}` contains {c:?}, which is not allowed in names"
        )));
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err(Error::invalid_name(format!(
            "{what} name `{name}` has an empty word between dots"
        )));
    }
    Ok(())
}

/// Checks a routing key: words split by `.`, none empty, no wildcards.
pub fn validate_routing_key(key: &str) -> Result<()> {
    if is_plain_dotted(key) {
        return Ok(());
    }
    check_words("routing key", key, false)
}

/// The common case, checked in one pass over the bytes on every publish: a
/// valid name or routing key made only of printable ASCII other than the
/// wildcards, with no empty word. Anything else takes the slow path, which
/// also names what is wrong.
fn is_plain_dotted(text: &str) -> bool {
    let bytes = text.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if bytes.len() > MAX_NAME_LEN || first == b'.' || last == b'.' {
        return false;
    }
    // Every byte is looked at, without a branch per byte.
    let mut plain = true;
    let mut previous = 0;
    for &b in bytes {
        plain &= PLAIN[usize::from(b)] & !((b == b'.') & (previous == b'.'));
        previous = b;
    }
    plain
}

/// The bytes a plain name is made of: printable ASCII but the wildcards.
static PLAIN: [bool; 256] = {
    let mut plain = [false; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        plain[b] = byte.is_ascii_graphic() && !matches!(byte, b'*' | b'#' | b'>');
        b += 1;
    }
    plain
};

/// Checks a binding pattern: words split by `.`, none empty; `*` and `#` only
/// as whole words.
pub fn validate_pattern(pattern: &str) -> Result<()> {
    check_words("pattern", pattern, true)
}

fn check_words(what: &str, text: &str, wildcards: bool) -> Result<()> {
    if text.is_empty() {
        return Err(Error::invalid_name(format!("{what} is empty")));
    }
    if text.len() > MAX_NAME_LEN {
        return Err(Error::invalid_name(format!(
            "{what} `{}…` is {} bytes long; the limit is {MAX_NAME_LEN}",
            truncate(text, 40),
            text.len()
        )));
    }
    for word in text.split('.') {
        if word.is_empty() {
            return Err(Error::invalid_name(format!(
                "{what} `{text}` has an empty word (words are split by `.`)"
            )));
        }
        if let Some(c) = word
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || *c == '>')
        {
            return Err(Error::invalid_name(format!(
                "{what} `{text}` contains {c:?}, which is not allowed"
            )));
        }
        let has_wildcard = word.contains('*') || word.contains('#');
        if has_wildcard && (!wildcards || word.len() > 1) {
            let rule = if wildcards {
                "`*` and `#` must stand alone as whole words"
            } else {
                "a routing key takes no wildcards"
            };
            return Err(Error::invalid_name(format!("{what} `{text}`: {rule}")));
        }
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Whether `routing_key` matches `pattern` under C16: `*` is exactly one word,
/// `#` zero or more words.
///
/// ```
/// use ticketrail_core::topic_matches;
///
/// assert!(topic_matches("user.#", "user.welcome"));
/// assert!(topic_matches("user.#", "user"));
/// assert!(topic_matches("*.created", "order.created"));
/// assert!(!topic_matches("*.created", "order.item.created"));
/// ```
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    let has_wildcard = |text: &str| text.bytes().any(|b| b == b'*' || b == b'#');
    if !has_wildcard(pattern) {
        return pattern == routing_key;
    }
    // The usual binding, `prefix.#` with a plain prefix, without splitting
    // either side into words: it matches the prefix itself and anything
    // under it.
    if let Some(prefix) = pattern.strip_suffix(".#") {
        if !has_wildcard(prefix) {
            return routing_key
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
        }
    }
    words_match(pattern.split('.'), routing_key.split('.'))
}

/// Matches the remaining pattern words against the remaining key words,
/// without allocating: `#` tries every suffix of the key.
fn words_match(mut pattern: std::str::Split<'_, char>, mut key: std::str::Split<'_, char>) -> bool {
    match pattern.next() {
        None => key.next().is_none(),
        Some("#") => loop {
            if words_match(pattern.clone(), key.clone()) {
                return true;
            }
            if key.next().is_none() {
                return false;
            }
        },
        Some(word) => match key.next() {
            Some(k) if word == "*" || word == k => words_match(pattern, key),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn matching_follows_c16() {
        let cases = [
            ("user.#", "user", true),
            ("user.#", "user.welcome", true),
            ("user.#", "user.a.b", true),
            ("user.#", "users.welcome", false),
            ("#", "anything.at.all", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.x.y.c", true),
            ("a.#.c", "a.x.y.d", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("#.end", "end", true),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(topic_matches(pattern, key), expected, "{pattern} vs {key}");
        }
    }

    #[test]
    fn a_prefix_binding_matches_as_word_by_word_matching_does() {
        let patterns = ["a.#", "a.b.#", "ab.#", "a.*.#", "#.#"];
        let keys = [
            "a", "ab", "a.b", "a.bc", "ab.c", "a.b.c", "b.a", "aa.b", "a.", "a..b", "abc",
        ];
        for pattern in patterns {
            for key in keys {
                let by_words = words_match(pattern.split('.'), key.split('.'));
                assert_eq!(topic_matches(pattern, key), by_words, "{pattern} vs {key}");
            }
        }
        assert!(topic_matches("a.b.#", "a.b.c"));
        assert!(!topic_matches("a.b.#", "a.bc"));
    }

    #[test]
    fn bad_names_are_rejected_with_the_reason() {
        let err = validate_name("queue", "").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidName);
        assert_eq!(err.message(), "queue name is empty");
        let err = validate_name("queue", "email notifications").unwrap_err();
        assert!(err.message().contains("' '"), "{err}");
        assert!(validate_name("queue", "q.*").is_err());
        assert!(validate_name("queue", &"x".repeat(256)).is_err());
        assert!(validate_name("queue", "email.notifications").is_ok());
    }

    #[test]
    fn the_fast_path_accepts_only_what_the_full_check_accepts() {
        let mut samples: Vec<String> = [
            "",
            ".",
            "..",
            "a",
            "a.b",
            ".a",
            "a.",
            "a..b",
            "a b",
            "a\tb",
            "a*",
            "a.#",
            "a>b",
            "ü.x",
            "a\u{7f}",
            "user.welcome",
            "x.y.z-1_2",
            "\u{a0}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        samples.push("x".repeat(255));
        samples.push("x".repeat(256));
        for text in &samples {
            // With or without the fast path, the answer is the full rule's.
            let full_name = {
                let name = text.as_str();
                !name.is_empty()
                    && name.len() <= MAX_NAME_LEN
                    && !name.chars().any(|c| {
                        c.is_whitespace() || c.is_control() || matches!(c, '*' | '#' | '>')
                    })
                    && !name.starts_with('.')
                    && !name.ends_with('.')
                    && !name.contains("..")
            };
            assert_eq!(validate_name("queue", text).is_ok(), full_name, "{text:?}");
            assert_eq!(
                validate_routing_key(text).is_ok(),
                check_words("routing key", text, false).is_ok(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn patterns_and_keys_are_checked() {
        assert!(validate_pattern("user.#").is_ok());
        assert!(validate_pattern("*.created").is_ok());
        let err = validate_pattern("user.we*").unwrap_err();
        assert!(err.message().contains("whole words"), "{err}");
        assert!(validate_pattern("user..x").is_err());
        assert!(validate_pattern("").is_err());
        assert!(validate_routing_key("user.welcome").is_ok());
        let err = validate_routing_key("user.*").unwrap_err();
        assert!(err.message().contains("no wildcards"), "{err}");
    }

    #[test]
    fn topology_validation_names_the_queue() {
        let t = Topology::new("app.events").queue(QueueSpec::new("q").bind("a..b"));
        let err = t.validate().unwrap_err();
        assert!(err.message().starts_with("queue `q`:"), "{err}");
        let t = Topology::new("app.events").queue(QueueSpec::new("q").delivery_limit(0));
        assert_eq!(t.validate().unwrap_err().kind(), ErrorKind::Config);
    }
}
