//! Bootstrap tokens: single-use, short-lived, bound to one node. Pure: time is passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("unknown token")]
    Unknown,
    #[error("token expired")]
    Expired,
    #[error("token already used")]
    AlreadyUsed,
    #[error("token is bound to {bound_to}, not {claimed}")]
    WrongNode { bound_to: String, claimed: String },
    /// Its node was given up, or the provisioning attempt it was issued for was torn down.
    #[error("token revoked")]
    Revoked,
}

#[derive(Debug)]
struct Entry {
    node_id: String,
    expires: Instant,
    used: bool,
    revoked: bool,
}

/// Tokens are kept by their SHA-256 only, so the store itself holds nothing worth stealing.
#[derive(Default, Debug)]
pub struct TokenStore {
    entries: HashMap<[u8; 32], Entry>,
}

impl TokenStore {
    /// Issues a fresh random token for `node_id`, valid for `ttl` from `now`.
    pub fn issue(&mut self, node_id: &str, ttl: Duration, now: Instant) -> String {
        let token = hex::encode(rand::random::<[u8; 32]>());
        self.entries.insert(
            digest(&token),
            Entry {
                node_id: node_id.to_string(),
                expires: now + ttl,
                used: false,
                revoked: false,
            },
        );
        token
    }

    /// Checks `token` for `node_id` without spending it.
    pub fn check(&self, token: &str, node_id: &str, now: Instant) -> Result<(), TokenRejection> {
        let entry = self
            .entries
            .get(&digest(token))
            .ok_or(TokenRejection::Unknown)?;
        if entry.revoked {
            return Err(TokenRejection::Revoked);
        }
        if entry.used {
            return Err(TokenRejection::AlreadyUsed);
        }
        if now >= entry.expires {
            return Err(TokenRejection::Expired);
        }
        if entry.node_id != node_id {
            return Err(TokenRejection::WrongNode {
                bound_to: entry.node_id.clone(),
                claimed: node_id.to_string(),
            });
        }
        Ok(())
    }

    /// Checks and spends `token`: it can never be used again.
    pub fn redeem(
        &mut self,
        token: &str,
        node_id: &str,
        now: Instant,
    ) -> Result<(), TokenRejection> {
        self.check(token, node_id, now)?;
        if let Some(entry) = self.entries.get_mut(&digest(token)) {
            entry.used = true;
        }
        Ok(())
    }
}

impl TokenStore {
    /// Revokes every token issued so far for `node_id`: none of them enrolls anything from
    /// now on. Tokens issued later are not affected (a new attempt's for the same node id).
    pub fn revoke_node(&mut self, node_id: &str) {
        for entry in self.entries.values_mut() {
            if entry.node_id == node_id {
                entry.revoked = true;
            }
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_works_once_for_its_node_until_it_expires() {
        let mut store = TokenStore::default();
        let t0 = Instant::now();
        let token = store.issue("node-1", Duration::from_secs(60), t0);
        assert_eq!(
            store.redeem(&token, "node-2", t0),
            Err(TokenRejection::WrongNode {
                bound_to: "node-1".into(),
                claimed: "node-2".into()
            })
        );
        // A rejected attempt spends nothing.
        assert_eq!(store.redeem(&token, "node-1", t0), Ok(()));
        assert_eq!(
            store.redeem(&token, "node-1", t0),
            Err(TokenRejection::AlreadyUsed)
        );
        let late = store.issue("node-3", Duration::from_secs(60), t0);
        assert_eq!(
            store.redeem(&late, "node-3", t0 + Duration::from_secs(61)),
            Err(TokenRejection::Expired)
        );
        assert_eq!(
            store.redeem("nope", "node-1", t0),
            Err(TokenRejection::Unknown)
        );
    }

    #[test]
    fn revoking_a_node_spends_its_earlier_tokens_not_later_ones() {
        let mut store = TokenStore::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let first = store.issue("node-1", ttl, t0);
        let other = store.issue("node-2", ttl, t0);
        store.revoke_node("node-1");
        assert_eq!(
            store.redeem(&first, "node-1", t0),
            Err(TokenRejection::Revoked)
        );
        let second = store.issue("node-1", ttl, t0);
        assert_eq!(store.redeem(&second, "node-1", t0), Ok(()));
        assert_eq!(store.redeem(&other, "node-2", t0), Ok(()));
    }
}
