//! Sealing of pipe secrets.
//!
//! Passwords are stored in etcd sealed with XChaCha20-Poly1305 under a 256-bit key that every
//! Ferry process is given (never stored in etcd). The pipe name is the associated data, so a
//! sealed value copied onto another pipe does not open. A random 192-bit nonce per seal makes
//! nonce reuse negligible without a counter.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ferry_proto::v1::{PipeSecrets, SealedSecrets};
use prost::Message as _;

/// Length of a secret key in bytes.
pub const KEY_LEN: usize = 32;

/// Why a key could not be loaded or a secret not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The key text is not base64 of exactly 32 bytes.
    #[error(
        "secret key must be {KEY_LEN} bytes encoded as base64 (generate one with `openssl rand -base64 32`)"
    )]
    BadKey,
    /// The sealed value was made with another key.
    #[error("secrets were sealed with key {sealed_with}, but this process has key {have}")]
    WrongKey {
        /// Key id stored with the value.
        sealed_with: String,
        /// Key id of this process.
        have: String,
    },
    /// Decryption failed: the value was altered or belongs to another pipe.
    #[error("sealed secrets failed authentication (altered, or sealed for another pipe)")]
    Corrupt,
    /// The decrypted bytes are not a `PipeSecrets` message.
    #[error("sealed secrets do not decode")]
    Decode(#[source] prost::DecodeError),
    /// The system random source failed.
    #[error("could not seal secrets")]
    Seal,
}

/// The key that seals and opens pipe secrets.
#[derive(Clone)]
pub struct SecretKey {
    cipher: XChaCha20Poly1305,
    id: String,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material, only its id.
        f.debug_struct("SecretKey").field("id", &self.id).finish()
    }
}

impl SecretKey {
    /// Builds a key from its base64 text (surrounding whitespace is ignored).
    pub fn from_base64(text: &str) -> Result<Self, SecretError> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|_| SecretError::BadKey)?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|_| SecretError::BadKey)?;
        let cipher = XChaCha20Poly1305::new(&bytes.into());
        // The id is the tag of an empty message under a fixed nonce: stable for a key, and
        // revealing nothing about it, so operators can tell keys apart during a rotation.
        let tag = cipher
            .encrypt(&XNonce::default(), &[][..])
            .map_err(|_| SecretError::BadKey)?;
        let id = tag[..6].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { cipher, id })
    }

    /// A fresh random key, as base64 text.
    pub fn generate_base64() -> String {
        BASE64.encode(XChaCha20Poly1305::generate_key(&mut OsRng))
    }

    /// Identifies the key without revealing it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `secrets` for the pipe `pipe`.
    pub fn seal(&self, pipe: &str, secrets: &PipeSecrets) -> Result<SealedSecrets, SecretError> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let plaintext = secrets.encode_to_vec();
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &plaintext,
                    aad: pipe.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Seal)?;
        Ok(SealedSecrets {
            key_id: self.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Opens secrets sealed for the pipe `pipe`.
    pub fn open(&self, pipe: &str, sealed: &SealedSecrets) -> Result<PipeSecrets, SecretError> {
        if sealed.key_id != self.id {
            return Err(SecretError::WrongKey {
                sealed_with: sealed.key_id.clone(),
                have: self.id.clone(),
            });
        }
        if sealed.nonce.len() != 24 {
            return Err(SecretError::Corrupt);
        }
        let plaintext = self
            .cipher
            .decrypt(
                XNonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: pipe.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Corrupt)?;
        PipeSecrets::decode(plaintext.as_slice()).map_err(SecretError::Decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> PipeSecrets {
        PipeSecrets {
            source_password: "hunter2-source".into(),
            destination_password: "hunter2-dest".into(),
        }
    }

    #[test]
    fn round_trip_and_binding() {
        let key = SecretKey::from_base64(&SecretKey::generate_base64()).unwrap();
        let sealed = key.seal("p1", &secrets()).unwrap();
        assert_eq!(key.open("p1", &sealed).unwrap(), secrets());
        assert!(matches!(key.open("p2", &sealed), Err(SecretError::Corrupt)));
        // Neither password appears in the stored bytes.
        let stored = prost::Message::encode_to_vec(&sealed);
        assert!(!stored.windows(7).any(|w| w == b"hunter2"));
    }

    #[test]
    fn wrong_key_is_named() {
        let a = SecretKey::from_base64(&SecretKey::generate_base64()).unwrap();
        let b = SecretKey::from_base64(&SecretKey::generate_base64()).unwrap();
        assert_ne!(a.id(), b.id());
        let sealed = a.seal("p", &secrets()).unwrap();
        assert!(matches!(
            b.open("p", &sealed),
            Err(SecretError::WrongKey { .. })
        ));
    }

    #[test]
    fn bad_keys() {
        assert!(SecretKey::from_base64("not base64!").is_err());
        assert!(SecretKey::from_base64(&BASE64.encode([1u8; 16])).is_err());
        let text = BASE64.encode([7u8; 32]);
        let key = SecretKey::from_base64(&format!(" {text}\n")).unwrap();
        assert_eq!(key.id().len(), 12);
        assert!(!format!("{key:?}").contains(&text));
    }
}
