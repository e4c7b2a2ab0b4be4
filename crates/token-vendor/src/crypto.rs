//! The only cryptography jsonwebtoken gets to use: Ed25519 (`alg: EdDSA`)
//! through ed25519-dalek, as a jsonwebtoken [`CryptoProvider`].
//!
//! jsonwebtoken's own RustCrypto backend (its `rust_crypto` feature) brings
//! every JWT algorithm along, RSA included, and with it the `rsa` crate and
//! its timing side channel (RUSTSEC-2023-0071). headcount signs and verifies
//! nothing but EdDSA, so it builds jsonwebtoken without a backend and
//! installs this provider instead: every other algorithm is an error, both
//! to sign and to verify, and the `rsa` crate is not in the build at all
//! (`cargo tree -i rsa` is empty; `cargo deny check` in `deploy/dev test`).

use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{ErrorKind, Result};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey};
use sha2::Digest;

/// EdDSA (Ed25519) and nothing else.
pub(crate) static EDDSA_ONLY: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: |_| Err(ErrorKind::UnsupportedAlgorithm.into()),
        rsa_pub_components_from_public_key: |_| Err(ErrorKind::UnsupportedAlgorithm.into()),
        ec_pub_components_from_private_key: |_, _| Err(ErrorKind::UnsupportedAlgorithm.into()),
        ed_pub_components_from_private_key,
        compute_digest,
    },
};

/// Makes [`EDDSA_ONLY`] jsonwebtoken's provider for this process, before
/// the first signature or verification. jsonwebtoken keeps the first
/// provider installed (a `OnceLock`), so calling this again is harmless.
/// Fails if some other provider got there first: without a backend compiled
/// in, jsonwebtoken's fallback panics at the first signature, and any other
/// provider is not the one whose behaviour this crate has tested.
pub(crate) fn install() -> anyhow::Result<()> {
    match EDDSA_ONLY.install_default() {
        Ok(()) => Ok(()),
        Err(current) if std::ptr::eq(current, &EDDSA_ONLY) => Ok(()),
        Err(_) => anyhow::bail!(
            "another jsonwebtoken CryptoProvider was installed (or jsonwebtoken was used) \
             before the token vendor started; the vendor needs its EdDSA-only provider"
        ),
    }
}

fn new_signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    match algorithm {
        Algorithm::EdDSA => Ok(Box::new(EdDsaSigner::new(key)?)),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    match algorithm {
        Algorithm::EdDSA => Ok(Box::new(EdDsaVerifier::new(key)?)),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

/// Signs with an Ed25519 key given as PKCS#8 DER
/// ([`EncodingKey::from_ed_der`]).
struct EdDsaSigner(SigningKey);

impl EdDsaSigner {
    fn new(key: &EncodingKey) -> Result<Self> {
        if key.family() != AlgorithmFamily::Ed {
            return Err(ErrorKind::InvalidKeyFormat.into());
        }
        SigningKey::from_pkcs8_der(key.as_bytes())
            .map(Self)
            .map_err(|_| ErrorKind::InvalidEddsaKey.into())
    }
}

impl Signer<Vec<u8>> for EdDsaSigner {
    fn try_sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
        Ok(self.0.sign(message).to_bytes().to_vec())
    }
}

impl JwtSigner for EdDsaSigner {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

/// Verifies with an Ed25519 public key given as its 32 raw bytes
/// ([`DecodingKey::from_ed_der`] of the public key, or a JWK's `x`).
struct EdDsaVerifier(VerifyingKey);

impl EdDsaVerifier {
    fn new(key: &DecodingKey) -> Result<Self> {
        if key.family() != AlgorithmFamily::Ed {
            return Err(ErrorKind::InvalidKeyFormat.into());
        }
        let bytes = <&[u8; 32]>::try_from(key.try_get_as_bytes()?)
            .map_err(|_| ErrorKind::InvalidEddsaKey)?;
        VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| ErrorKind::InvalidEddsaKey.into())
    }
}

impl Verifier<Vec<u8>> for EdDsaVerifier {
    fn verify(
        &self,
        message: &[u8],
        signature: &Vec<u8>,
    ) -> std::result::Result<(), signature::Error> {
        // Strict: also refuses small-order keys and non-canonical signatures,
        // none of which an honest signer of ours ever produces.
        self.0
            .verify_strict(message, &Signature::from_slice(signature)?)
    }
}

impl JwtVerifier for EdDsaVerifier {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

fn ed_pub_components_from_private_key(der: &[u8], curve: &EllipticCurve) -> Result<Vec<u8>> {
    match curve {
        EllipticCurve::Ed25519 => Ok(SigningKey::from_pkcs8_der(der)
            .map_err(|_| ErrorKind::InvalidEddsaKey)?
            .verifying_key()
            .to_bytes()
            .to_vec()),
        _ => Err(ErrorKind::UnsupportedAlgorithm.into()),
    }
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>> {
    Ok(match hash {
        ThumbprintHash::SHA256 => sha2::Sha256::digest(data).to_vec(),
        ThumbprintHash::SHA384 => sha2::Sha384::digest(data).to_vec(),
        ThumbprintHash::SHA512 => sha2::Sha512::digest(data).to_vec(),
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    })
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{Header, Validation};

    use super::*;
    use crate::keys::KeyPair;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Claims {
        sub: String,
        exp: u64,
    }

    fn claims() -> Claims {
        Claims {
            sub: "tv-1".into(),
            exp: jsonwebtoken::get_current_timestamp() + 60,
        }
    }

    #[test]
    fn eddsa_round_trips() {
        install().unwrap();
        let key = KeyPair::from_seed([5; 32], 1).unwrap();
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims(), &key.encoding).unwrap();
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Claims>(&token, &key.decoding, &validation).unwrap();
        assert_eq!(data.claims.sub, "tv-1");

        // Another key's signature does not verify.
        let other = KeyPair::from_seed([6; 32], 1).unwrap();
        let err = jsonwebtoken::decode::<Claims>(&token, &other.decoding, &validation)
            .err()
            .unwrap();
        assert_eq!(err.kind(), &ErrorKind::InvalidSignature);
    }

    #[test]
    fn every_other_algorithm_is_an_error() {
        install().unwrap();
        let key = KeyPair::from_seed([5; 32], 1).unwrap();
        let secret = EncodingKey::from_secret(b"secret");
        let public = DecodingKey::from_secret(b"secret");
        for alg in [
            Algorithm::HS256,
            Algorithm::HS384,
            Algorithm::HS512,
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ] {
            assert!(new_signer(&alg, &secret).is_err(), "{alg:?}");
            assert!(new_signer(&alg, &key.encoding).is_err(), "{alg:?}");
            assert!(new_verifier(&alg, &public).is_err(), "{alg:?}");
            assert!(new_verifier(&alg, &key.decoding).is_err(), "{alg:?}");
        }
        // An HMAC key is not an Ed25519 key, even when asked for EdDSA.
        assert!(new_signer(&Algorithm::EdDSA, &secret).is_err());
        assert!(new_verifier(&Algorithm::EdDSA, &public).is_err());
        let err = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims(), &secret)
            .err()
            .unwrap();
        assert_eq!(err.kind(), &ErrorKind::InvalidAlgorithm);
    }

    #[test]
    fn a_short_public_key_is_an_error_not_a_panic() {
        let short = DecodingKey::from_ed_components("AAAA").unwrap();
        assert!(new_verifier(&Algorithm::EdDSA, &short).is_err());
    }

    #[test]
    fn installing_again_is_fine() {
        install().unwrap();
        install().unwrap();
    }
}
