//! Where a message goes: a topic (fanned out to matching subscription
//! groups) or a named queue.

use std::fmt;
use std::sync::Arc;

use crate::error::NameError;

/// Longest queue name, topic or pattern accepted (the AMQP short-string limit).
const MAX_NAME_LEN: usize = 255;

/// The name of a queue: 1–255 bytes of ASCII letters, digits and `_ - . :`.
///
/// ```
/// use busway_core::QueueName;
/// assert!(QueueName::new("task_queue").is_ok());
/// assert!(QueueName::new("bad name").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(Arc<str>);

impl QueueName {
    /// Validates and wraps a queue name.
    pub fn new(name: impl AsRef<str>) -> Result<Self, NameError> {
        let name = name.as_ref();
        check_len("queue name", name)?;
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
        {
            return Err(NameError::InvalidCharacter {
                what: "queue name",
                name: name.to_owned(),
                character: c,
            });
        }
        Ok(Self(name.into()))
    }

    /// A reply address taken from a request's `reply_to`, which the broker
    /// may have generated with characters a declared queue name may not
    /// have (RabbitMQ's direct reply-to: `amq.rabbitmq.reply-to.g1h…==`).
    /// Accepts 1–255 bytes of visible ASCII.
    ///
    /// ```
    /// use busway_core::QueueName;
    /// assert!(QueueName::reply_address("amq.rabbitmq.reply-to.g1hkABFy/YQ==").is_ok());
    /// assert!(QueueName::reply_address("two words").is_err());
    /// ```
    pub fn reply_address(address: impl AsRef<str>) -> Result<Self, NameError> {
        let address = address.as_ref();
        check_len("reply address", address)?;
        if let Some(c) = address.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(NameError::InvalidCharacter {
                what: "reply address",
                name: address.to_owned(),
                character: c,
            });
        }
        Ok(Self(address.into()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The conventional dead-letter queue of this queue: `dead_letter_{name}`.
    pub fn dead_letter_queue(&self) -> QueueName {
        // Prefix + valid name stays valid unless it grows past the limit; then
        // the suffix is cut, which keeps it valid and deterministic.
        let full = format!("dead_letter_{}", self.0);
        let cut = &full[..full.len().min(MAX_NAME_LEN)];
        QueueName(cut.into())
    }
}

/// A topic a message is published to: dot-separated words such as
/// `order.created`. Words are non-empty and contain neither `*` nor `#`.
///
/// ```
/// use busway_core::Topic;
/// assert_eq!(Topic::new("user.registered")?.words().count(), 2);
/// assert!(Topic::new("user.*").is_err());
/// # Ok::<(), busway_core::NameError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Validates and wraps a topic.
    pub fn new(topic: impl AsRef<str>) -> Result<Self, NameError> {
        let topic = topic.as_ref();
        check_len("topic", topic)?;
        for word in topic.split('.') {
            check_word("topic", topic, word)?;
            if word == "*" || word == "#" || word.contains(['*', '#']) {
                return Err(NameError::WildcardInTopic {
                    topic: topic.to_owned(),
                });
            }
        }
        Ok(Self(topic.into()))
    }

    /// The topic as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The dot-separated words of the topic.
    pub fn words(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }
}

/// A subscription pattern with AMQP topic semantics: `*` matches exactly one
/// word, `#` matches zero or more words.
///
/// ```
/// use busway_core::{Topic, TopicPattern};
/// let pattern = TopicPattern::new("order.#")?;
/// assert!(pattern.matches(&Topic::new("order")?));
/// assert!(pattern.matches(&Topic::new("order.paid.late")?));
/// assert!(!TopicPattern::new("order.*")?.matches(&Topic::new("order.paid.late")?));
/// # Ok::<(), busway_core::NameError>(())
/// ```
#[derive(Clone)]
pub struct TopicPattern {
    raw: Arc<str>,
    words: Arc<[PatternWord]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PatternWord {
    Literal(Box<str>),
    One,
    Many,
}

impl TopicPattern {
    /// Validates and compiles a pattern.
    pub fn new(pattern: impl AsRef<str>) -> Result<Self, NameError> {
        let pattern = pattern.as_ref();
        check_len("topic pattern", pattern)?;
        let mut words = Vec::new();
        for word in pattern.split('.') {
            check_word("topic pattern", pattern, word)?;
            words.push(match word {
                "*" => PatternWord::One,
                "#" => PatternWord::Many,
                w if w.contains(['*', '#']) => {
                    return Err(NameError::PartialWildcard {
                        pattern: pattern.to_owned(),
                        word: w.to_owned(),
                    })
                }
                w => PatternWord::Literal(w.into()),
            });
        }
        Ok(Self {
            raw: pattern.into(),
            words: words.into(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `topic` matches this pattern.
    pub fn matches(&self, topic: &Topic) -> bool {
        let topic: Vec<&str> = topic.words().collect();
        // reachable[j]: the pattern prefix seen so far can consume exactly
        // the first j topic words.
        let mut reachable = vec![false; topic.len() + 1];
        reachable[0] = true;
        for word in self.words.iter() {
            let mut next = vec![false; topic.len() + 1];
            match word {
                PatternWord::Many => {
                    let mut any = false;
                    for j in 0..=topic.len() {
                        any |= reachable[j];
                        next[j] = any;
                    }
                }
                PatternWord::One => {
                    next[1..].copy_from_slice(&reachable[..topic.len()]);
                }
                PatternWord::Literal(lit) => {
                    for j in 0..topic.len() {
                        next[j + 1] = reachable[j] && *topic[j] == **lit;
                    }
                }
            }
            reachable = next;
        }
        reachable[topic.len()]
    }
}

impl PartialEq for TopicPattern {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl Eq for TopicPattern {}
impl std::hash::Hash for TopicPattern {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.raw.hash(state)
    }
}

/// Where a published message goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// Fanned out to every queue bound with a matching pattern.
    Topic(Topic),
    /// Straight to one named queue.
    Queue(QueueName),
}

fn check_len(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what,
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    Ok(())
}

fn check_word(what: &'static str, name: &str, word: &str) -> Result<(), NameError> {
    if word.is_empty() {
        return Err(NameError::EmptyWord {
            what,
            name: name.to_owned(),
        });
    }
    if let Some(c) = word.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(NameError::InvalidCharacter {
            what,
            name: name.to_owned(),
            character: c,
        });
    }
    Ok(())
}

macro_rules! string_like {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.as_str(), f)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
        impl std::str::FromStr for $t {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    )*};
}
string_like!(QueueName, Topic, TopicPattern);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A plain recursive matcher: the specification the compiled matcher must agree with.
    fn reference_match(pattern: &[&str], topic: &[&str]) -> bool {
        match (pattern.first(), topic.first()) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(&"#"), _) => {
                reference_match(&pattern[1..], topic)
                    || (!topic.is_empty() && reference_match(pattern, &topic[1..]))
            }
            (Some(_), None) => false,
            (Some(&"*"), Some(_)) => reference_match(&pattern[1..], &topic[1..]),
            (Some(p), Some(t)) => p == t && reference_match(&pattern[1..], &topic[1..]),
        }
    }

    fn topic_words() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "order"]), 1..7)
            .prop_map(|w| w.into_iter().map(String::from).collect())
    }

    fn pattern_words() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(
            prop::sample::select(vec!["a", "b", "c", "order", "*", "#"]),
            1..7,
        )
        .prop_map(|w| w.into_iter().map(String::from).collect())
    }

    proptest! {
        #[test]
        fn agrees_with_reference(p in pattern_words(), t in topic_words()) {
            let pattern = TopicPattern::new(p.join("."))?;
            let topic = Topic::new(t.join("."))?;
            let p: Vec<&str> = p.iter().map(String::as_str).collect();
            let t: Vec<&str> = t.iter().map(String::as_str).collect();
            prop_assert_eq!(pattern.matches(&topic), reference_match(&p, &t));
        }

        #[test]
        fn topic_matches_itself(t in topic_words()) {
            let topic = Topic::new(t.join("."))?;
            prop_assert!(TopicPattern::new(topic.as_str())?.matches(&topic));
        }

        #[test]
        fn hash_matches_everything(t in topic_words()) {
            prop_assert!(TopicPattern::new("#")?.matches(&Topic::new(t.join("."))?));
        }

        #[test]
        fn star_replaces_exactly_one_word(t in topic_words(), i in 0usize..7) {
            let i = i % t.len();
            let mut p = t.clone();
            p[i] = "*".into();
            let topic = Topic::new(t.join("."))?;
            prop_assert!(TopicPattern::new(p.join("."))?.matches(&topic));
            // One extra word never matches a pattern without `#`.
            let longer = Topic::new(format!("{}.extra", t.join(".")))?;
            prop_assert!(!TopicPattern::new(p.join("."))?.matches(&longer));
        }

        #[test]
        fn hash_replaces_any_run(t in topic_words(), a in 0usize..7, b in 0usize..7) {
            let (a, b) = (a % (t.len() + 1), b % (t.len() + 1));
            let (lo, hi) = (a.min(b), a.max(b));
            let mut p: Vec<String> = t[..lo].to_vec();
            p.push("#".into());
            p.extend_from_slice(&t[hi..]);
            prop_assert!(TopicPattern::new(p.join("."))?.matches(&Topic::new(t.join("."))?));
        }
    }

    #[test]
    fn amqp_examples() -> Result<(), NameError> {
        let cases = [
            ("order.*", "order.created", true),
            ("order.*", "order", false),
            ("order.*", "order.paid.late", false),
            ("order.#", "order", true),
            ("#.created", "user.created", true),
            ("#.created", "created", true),
            ("*.created", "created", false),
            ("a.#.z", "a.z", true),
            ("a.#.z", "a.b.c.z", true),
            ("a.#.#.z", "a.z", true),
            ("user.registered", "user.registered", true),
            ("user.registered", "user.deleted", false),
        ];
        for (p, t, expected) in cases {
            assert_eq!(
                TopicPattern::new(p)?.matches(&Topic::new(t)?),
                expected,
                "{p} vs {t}"
            );
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_names() {
        assert!(matches!(QueueName::new(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            QueueName::new("a b"),
            Err(NameError::InvalidCharacter { character: ' ', .. })
        ));
        assert!(matches!(
            QueueName::new("x".repeat(256)),
            Err(NameError::TooLong { len: 256, .. })
        ));
        assert!(matches!(
            Topic::new("a..b"),
            Err(NameError::EmptyWord { .. })
        ));
        assert!(matches!(
            Topic::new("a.#"),
            Err(NameError::WildcardInTopic { .. })
        ));
        assert!(matches!(
            TopicPattern::new("a.b*"),
            Err(NameError::PartialWildcard { .. })
        ));
        assert!(matches!(
            TopicPattern::new("a."),
            Err(NameError::EmptyWord { .. })
        ));
    }

    #[test]
    fn dead_letter_queue_name_stays_valid() -> Result<(), NameError> {
        assert_eq!(
            QueueName::new("task_queue")?.dead_letter_queue().as_str(),
            "dead_letter_task_queue"
        );
        let long = QueueName::new("q".repeat(255))?;
        QueueName::new(long.dead_letter_queue().as_str())?;
        Ok(())
    }
}
