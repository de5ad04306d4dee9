//! [`Epoch`]: the name of one incarnation of a session's log.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Names one incarnation of a session's log. A log gets a fresh epoch when it is created,
/// and again whenever it is recreated (removed, or its Redis head lost), so a client that
/// holds a `lastSeq` from an older incarnation can tell its numbers no longer apply.
///
/// An epoch is never empty: a session that has no log has no epoch (`Option<Epoch>`, see
/// [`LogHead`](super::LogHead)). Only on the wire does "no log yet" become `""` (the
/// `subscribed` payload's `epoch` is a string, SPEC §1): [`Epoch::wire`] writes it and
/// [`Epoch::parse`] reads it back as `None`. It serializes as its plain string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(Arc<str>);

impl Epoch {
    /// A new, random epoch, for a log being created.
    pub fn fresh() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string().into())
    }

    /// The epoch named `text`, `None` for `""` (no log).
    pub fn parse(text: &str) -> Option<Self> {
        (!text.is_empty()).then(|| Self(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An optional epoch as clients see it: `""` while the session has no log.
    pub fn wire(epoch: Option<&Epoch>) -> &str {
        epoch.map_or("", Epoch::as_str)
    }

    /// Serializes an optional epoch in its [wire](Epoch::wire) form (`serialize_with`).
    pub fn serialize_wire<S: Serializer>(
        epoch: &Option<Epoch>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(Epoch::wire(epoch.as_ref()))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Epoch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Epoch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Epoch::parse(&text).ok_or_else(|| serde::de::Error::custom("an epoch is never empty"))
    }
}

#[cfg(test)]
mod tests {
    use super::Epoch;

    #[test]
    fn an_epoch_is_a_non_empty_string_on_the_wire() {
        assert_eq!(Epoch::parse(""), None);
        let epoch = Epoch::parse("e1").unwrap();
        assert_eq!(serde_json::to_string(&epoch).unwrap(), r#""e1""#);
        assert_eq!(serde_json::from_str::<Epoch>(r#""e1""#).unwrap(), epoch);
        assert!(serde_json::from_str::<Epoch>(r#""""#).is_err());
        assert_eq!(Epoch::wire(None), "");
        assert_eq!(Epoch::wire(Some(&epoch)), "e1");
        let fresh = Epoch::fresh();
        assert_ne!(fresh, Epoch::fresh());
        assert_eq!(Epoch::parse(fresh.as_str()), Some(fresh));
    }
}
