//! The announcement of an append, on [`Keys::announcements`](super::Keys::announcements):
//! `"<last_seq> <epoch> <session id>"`. It is published by the append script itself (so it
//! goes out exactly when events were logged); its encoder, the Lua function below, and its
//! decoder, [`Announcement::parse`], are kept side by side here.

use crate::log::Epoch;

/// Lua defining `announce(channel, last_seq, epoch, session_id)` (all strings), the
/// encoder; the append script is built on it ([`super::log`]).
pub(super) const ANNOUNCE_LUA: &str = r#"
local function announce(channel, last_seq, epoch, session_id)
  redis.call('PUBLISH', channel, last_seq .. ' ' .. epoch .. ' ' .. session_id)
end
"#;

/// What an append announces: the session's log (incarnation `epoch`) now ends at
/// `last_seq`.
#[derive(Debug, PartialEq, Eq)]
pub struct Announcement<'a> {
    pub last_seq: u64,
    pub epoch: Epoch,
    pub session_id: &'a str,
}

impl<'a> Announcement<'a> {
    /// Decodes what the append script publishes (`ANNOUNCE_LUA`).
    pub fn parse(payload: &'a str) -> Option<Self> {
        let mut parts = payload.splitn(3, ' ');
        let last_seq = parts.next()?.parse().ok()?;
        let epoch = Epoch::parse(parts.next()?)?;
        let session_id = parts.next().filter(|s| !s.is_empty())?;
        Some(Self {
            last_seq,
            epoch,
            session_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Announcement, Epoch};

    #[test]
    fn announcements_decode_what_the_append_script_encodes() {
        assert_eq!(
            Announcement::parse("42 e1 user:7-a b"),
            Some(Announcement {
                last_seq: 42,
                epoch: Epoch::parse("e1").unwrap(),
                session_id: "user:7-a b",
            })
        );
        for bad in ["", "42", "42 e1", "x e1 s", "42  s", "-1 e1 s"] {
            assert_eq!(Announcement::parse(bad), None, "{bad:?}");
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::Announcement;
    use crate::fuzzing::Fuzz;

    /// Another node's announcement (or anything else on the channel) decodes to one that
    /// re-encodes to itself, or to nothing.
    #[test]
    fn fuzz_announcements() {
        let seeds: &[&[u8]] = &[
            b"42 0123456789abcdef0123456789abcdef sess-1",
            b"1 00000000000000000000000000000001 a b c",
        ];
        Fuzz::new("announcement").run(seeds, |input| {
            let payload = String::from_utf8_lossy(input);
            if let Some(announcement) = Announcement::parse(&payload) {
                let again = format!(
                    "{} {} {}",
                    announcement.last_seq, announcement.epoch, announcement.session_id
                );
                assert_eq!(Announcement::parse(&again), Some(announcement));
            }
        });
    }
}
