//! Issuing and verifying: the round trip and every way a token is refused.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use headcount_protocol::{AccountId, DeviceId, SessionId};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use super::*;

/// A vendor on `dir` with the default settings changed by `edit`, its own
/// registry, and never the signing key from the environment.
pub(crate) fn test_vendor(
    dir: &Path,
    edit: impl FnOnce(&mut Config),
) -> (Vendor, prometheus::Registry) {
    let mut config = Config::new(dir, "operator");
    edit(&mut config);
    let registry = prometheus::Registry::new();
    let vendor = Vendor::build(config, &registry, None, None).unwrap();
    (vendor, registry)
}

/// The value of counter `name` with `label` = `value`.
pub(crate) fn counter(
    registry: &prometheus::Registry,
    name: &str,
    label: &str,
    value: &str,
) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == label && l.value() == value)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

pub(crate) fn verifications(registry: &prometheus::Registry, result: &str) -> u64 {
    counter(
        registry,
        "headcount_token_verifications_total",
        "result",
        result,
    )
}

/// A vendor with the default settings, its registry, and its data dir of
/// its own (which must outlive it).
fn fresh() -> (Vendor, prometheus::Registry, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (vendor, registry) = test_vendor(dir.path(), |_| {});
    (vendor, registry, dir)
}

fn acme() -> AccountId {
    AccountId::parse("acme").unwrap()
}

fn tv() -> DeviceId {
    DeviceId::parse("tv-1").unwrap()
}

fn now() -> u64 {
    now_millis() / 1000
}

/// Claims as the vendor would issue them now.
fn claims(vendor: &Vendor) -> Claims {
    let reply = vendor.issue(&acme(), &tv(), "nats").unwrap();
    vendor.verify(&reply.token).unwrap()
}

/// A token signed with `vendor`'s own key but made by hand.
fn sign_by_hand(vendor: &Vendor, header: &Header, claims: &impl Serialize) -> String {
    let keys = vendor.keys();
    jsonwebtoken::encode(header, claims, &keys.signer().encoding).unwrap()
}

fn eddsa_header(vendor: &Vendor) -> Header {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(vendor.keys().signer().kid.clone());
    header
}

fn b64(value: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

#[test]
fn issued_tokens_verify_with_their_claims() {
    let (vendor, registry, _dir) = fresh();
    let before = now();
    let reply = vendor.issue(&acme(), &tv(), "nats").unwrap();
    let claims = vendor.verify(&reply.token).unwrap();
    assert_eq!(claims.device.as_str(), "tv-1");
    assert_eq!(claims.account.as_str(), "acme");
    assert_eq!(claims.session.as_str(), reply.session.as_str());
    assert_eq!(claims.iss, DEFAULT_ISSUER);
    assert_eq!(claims.aud, DEFAULT_AUDIENCE);
    assert_eq!(claims.plan, None);
    assert!(claims.iat >= before && claims.iat <= now());
    assert_eq!(claims.nbf, claims.iat);
    assert_eq!(claims.exp - claims.iat, DEFAULT_TOKEN_TTL.as_secs());
    assert_eq!(reply.expires_at, claims.exp * 1000);
    assert_eq!(reply.session.as_str().len(), 22);
    assert_eq!(claims.session, reply.session);
    assert_eq!(claims.account, acme());
    assert_eq!(claims.device, tv());

    let header = jsonwebtoken::decode_header(&reply.token).unwrap();
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(
        header.kid.as_deref(),
        Some(vendor.keys().signer().kid.as_str())
    );

    assert_eq!(
        counter(&registry, "headcount_tokens_issued_total", "via", "nats"),
        1
    );
    assert_eq!(
        counter(&registry, "headcount_tokens_issued_total", "via", "http"),
        0
    );
    assert_eq!(verifications(&registry, "ok"), 1);
}

#[test]
fn every_token_starts_a_new_session() {
    let (vendor, _, _dir) = fresh();
    let a = vendor.issue(&acme(), &tv(), "http").unwrap();
    let b = vendor.issue(&acme(), &tv(), "http").unwrap();
    assert_ne!(a.session, b.session);
}

#[test]
fn the_ttl_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let (vendor, _) = test_vendor(dir.path(), |c| c.token_ttl = Duration::from_secs(90));
    let c = claims(&vendor);
    assert_eq!(c.exp - c.iat, 90);
}

/// What a fresh vendor (default settings, a data dir of its own) makes of
/// the token `make` returns, and the vendor's registry. `make` is given the
/// vendor and its data dir, to make tokens the vendor itself would not.
fn verify_made(
    make: impl FnOnce(&Vendor, &Path) -> String,
) -> (Result<Claims, TokenError>, prometheus::Registry) {
    let (vendor, registry, dir) = fresh();
    let token = make(&vendor, dir.path());
    (vendor.verify(&token), registry)
}

/// A token of `vendor`'s, issued as if the time were `at`.
fn issued_at(vendor: &Vendor, at: u64) -> String {
    vendor.issue_at(&acme(), &tv(), "nats", at).unwrap().token
}

/// A token of a vendor on `dir` with the default settings changed by
/// `edit`.
fn issued_by(dir: &Path, edit: impl FnOnce(&mut Config)) -> String {
    let (vendor, _) = test_vendor(dir, edit);
    vendor.issue(&acme(), &tv(), "nats").unwrap().token
}

#[test]
fn expired_tokens_are_refused() {
    let long_ago = now() - DEFAULT_TOKEN_TTL.as_secs() - LEEWAY_SECS - 60;
    let (verdict, registry) = verify_made(|vendor, _| issued_at(vendor, long_ago));
    assert_eq!(verdict, Err(TokenError::Expired));
    assert_eq!(verifications(&registry, "expired"), 1);
}

#[test]
fn tokens_within_the_leeway_still_verify() {
    let just_expired = now() - DEFAULT_TOKEN_TTL.as_secs() - LEEWAY_SECS / 2;
    let (verdict, _) = verify_made(|vendor, _| issued_at(vendor, just_expired));
    assert!(verdict.is_ok());
}

#[test]
fn tokens_from_the_future_are_refused() {
    let later = now() + LEEWAY_SECS + 600;
    let (verdict, _) = verify_made(|vendor, _| issued_at(vendor, later));
    assert_eq!(verdict, Err(TokenError::NotYetValid));
}

#[test]
fn another_audience_is_refused() {
    // Same data dir, hence the same key: only the audience differs.
    let (verdict, _) = verify_made(|_, dir| issued_by(dir, |c| c.audience = "someone-else".into()));
    assert_eq!(verdict, Err(TokenError::WrongAudience));
}

#[test]
fn another_issuer_is_refused() {
    let (verdict, _) = verify_made(|_, dir| issued_by(dir, |c| c.issuer = "someone-else".into()));
    assert_eq!(verdict, Err(TokenError::WrongIssuer));
}

#[test]
fn a_key_from_another_vendor_is_unknown() {
    let other_dir = tempfile::tempdir().unwrap();
    let (verdict, registry) = verify_made(|_, _| issued_by(other_dir.path(), |_| {}));
    assert_eq!(verdict, Err(TokenError::UnknownKid));
    assert_eq!(verifications(&registry, "unknown_kid"), 1);
}

#[test]
fn a_token_without_kid_is_refused() {
    let (verdict, _) = verify_made(|vendor, _| {
        sign_by_hand(vendor, &Header::new(Algorithm::EdDSA), &claims(vendor))
    });
    assert_eq!(verdict, Err(TokenError::UnknownKid));
}

#[test]
fn another_key_claiming_our_kid_fails_the_signature() {
    let other_dir = tempfile::tempdir().unwrap();
    let (verdict, _) = verify_made(|vendor, _| {
        let (other, _) = test_vendor(other_dir.path(), |_| {});
        sign_by_hand(&other, &eddsa_header(vendor), &claims(vendor))
    });
    assert_eq!(verdict, Err(TokenError::BadSignature));
}

#[test]
fn tampered_tokens_are_refused() {
    let (vendor, registry, _dir) = fresh();
    let token = vendor.issue(&acme(), &tv(), "nats").unwrap().token;
    let (message, signature) = token.rsplit_once('.').unwrap();

    // One character of the signature changed.
    let mut sig: Vec<u8> = signature.bytes().collect();
    sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
    let bad_sig = format!("{message}.{}", String::from_utf8(sig).unwrap());
    assert_eq!(vendor.verify(&bad_sig), Err(TokenError::BadSignature));

    // The signature cut short or dropped.
    assert_eq!(
        vendor.verify(&format!("{message}.{}", &signature[..20])),
        Err(TokenError::BadSignature)
    );
    assert_eq!(
        vendor.verify(&format!("{message}.")),
        Err(TokenError::BadSignature)
    );

    // The claims changed under the original signature.
    let (header, _) = message.split_once('.').unwrap();
    let mut forged = WireClaims::from(claims(&vendor));
    forged.acct = "other-account".into();
    let forged = format!(
        "{header}.{}.{signature}",
        b64(&serde_json::to_value(&forged).unwrap())
    );
    assert_eq!(vendor.verify(&forged), Err(TokenError::BadSignature));
    assert_eq!(verifications(&registry, "bad_signature"), 4);
}

#[test]
fn unsigned_tokens_are_refused() {
    let (vendor, _, _dir) = fresh();
    let kid = vendor.keys().signer().kid.clone();
    let payload = b64(&serde_json::to_value(claims(&vendor)).unwrap());
    for header in [
        json!({"alg": "none", "typ": "JWT"}),
        json!({"alg": "none", "typ": "JWT", "kid": kid}),
        json!({"alg": "None", "kid": kid}),
    ] {
        for signature in ["", "c2lnbmF0dXJl"] {
            let token = format!("{}.{payload}.{signature}", b64(&header));
            assert_eq!(
                vendor.verify(&token),
                Err(TokenError::BadSignature),
                "{header}"
            );
        }
    }
}

#[test]
fn hmac_with_the_public_key_is_refused() {
    // The classic algorithm confusion: sign with HS256, using the published
    // public key as the HMAC secret.
    let (vendor, _, _dir) = fresh();
    let keys = vendor.keys();
    let header = b64(&json!({"alg": "HS256", "typ": "JWT", "kid": keys.signer().kid}));
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(&vendor)).unwrap());
    let message = format!("{header}.{payload}");
    // By hand: the vendor's jsonwebtoken signs nothing but EdDSA.
    let mac = hmac_sha256(&keys.signer().public, message.as_bytes());
    let token = format!("{message}.{}", URL_SAFE_NO_PAD.encode(mac));
    assert_eq!(vendor.verify(&token), Err(TokenError::BadSignature));
    // Nor will jsonwebtoken make such a token here.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(keys.signer().kid.clone());
    let secret = EncodingKey::from_secret(&keys.signer().public);
    assert!(jsonwebtoken::encode(&header, &claims(&vendor), &secret).is_err());
}

/// HMAC-SHA256 (RFC 2104), to forge the tokens an attacker would.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

#[test]
fn hmac_sha256_matches_rfc_4231() {
    // Test case 2 of RFC 4231.
    let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
    assert_eq!(
        data_encoding::HEXLOWER.encode(&mac),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[test]
fn oversized_tokens_are_refused_before_parsing() {
    let (vendor, registry, _dir) = fresh();
    assert_eq!(
        vendor.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)),
        Err(TokenError::TooLarge)
    );
    // A properly signed token is refused too once it is over the limit.
    let mut big = claims(&vendor);
    big.plan = Some("p".repeat(MAX_TOKEN_BYTES));
    let token = sign_by_hand(&vendor, &eddsa_header(&vendor), &big);
    assert_eq!(vendor.verify(&token), Err(TokenError::TooLarge));
    assert_eq!(verifications(&registry, "too_large"), 2);
}

#[test]
fn garbage_is_malformed() {
    let (vendor, registry, _dir) = fresh();
    let header = b64(&json!({"alg": "EdDSA", "kid": vendor.keys().signer().kid}));
    let garbage = [
        String::new(),
        "garbage".into(),
        "a.b".into(),
        "a.b.c".into(),
        "a.b.c.d".into(),
        "..".into(),
        "€.€.€".into(),
        format!("{}.e30.c2ln", b64(&json!(["alg", "EdDSA"]))),
        format!("{}.e30.c2ln", b64(&json!({"kid": "x"}))),
        format!("{}.e30.c2ln", b64(&json!({"alg": 5}))),
        format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode("not json")),
        format!("{header}.a.b.c"),
    ];
    for token in &garbage {
        assert_eq!(
            vendor.verify(token),
            Err(TokenError::Malformed),
            "{token:?}"
        );
    }
    assert_eq!(verifications(&registry, "malformed"), garbage.len() as u64);
}

#[test]
fn signed_claims_of_the_wrong_shape_are_malformed() {
    let (vendor, _, _dir) = fresh();
    let mut missing_sid = serde_json::to_value(claims(&vendor)).unwrap();
    missing_sid.as_object_mut().unwrap().remove("sid");
    let token = sign_by_hand(&vendor, &eddsa_header(&vendor), &missing_sid);
    assert_eq!(vendor.verify(&token), Err(TokenError::Malformed));
}

#[test]
fn claims_are_signed_in_their_wire_form() {
    let (vendor, _, _dir) = fresh();
    let reply = vendor
        .issue_with_plan(&acme(), &tv(), Some("basic"), "nats")
        .unwrap();
    let claims = vendor.verify(&reply.token).unwrap();
    // The payload is the claims' JSON: names as strings, in this order.
    let payload = reply.token.split('.').nth(1).unwrap();
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(payload, serde_json::to_string(&claims).unwrap());
    let expected = format!(
        r#"{{"sub":"tv-1","acct":"acme","sid":"{}","iat":{},"exp":{},"nbf":{},"iss":"{DEFAULT_ISSUER}","aud":"{DEFAULT_AUDIENCE}","plan":"basic"}}"#,
        reply.session, claims.iat, claims.exp, claims.nbf
    );
    assert_eq!(payload, expected);
    assert_eq!(serde_json::from_str::<Claims>(&payload).unwrap(), claims);
    // Read through serde, a name that does not parse is an error.
    let bad = payload.replace(r#""acct":"acme""#, r#""acct":"ac.me""#);
    let e = serde_json::from_str::<Claims>(&bad).unwrap_err();
    assert!(e.to_string().contains("account may only contain"), "{e}");
}

#[test]
fn signed_claims_with_invalid_names_are_refused() {
    let (vendor, registry, _dir) = fresh();
    let edits: [fn(&mut WireClaims); 4] = [
        |c| c.acct = "a.b".into(),
        |c| c.sub = String::new(),
        |c| c.sid = "s*".into(),
        |c| c.acct = "x".repeat(65),
    ];
    for edit in edits {
        let mut c = WireClaims::from(claims(&vendor));
        edit(&mut c);
        let token = sign_by_hand(&vendor, &eddsa_header(&vendor), &c);
        assert_eq!(vendor.verify(&token), Err(TokenError::BadClaims), "{c:?}");
    }
    assert_eq!(verifications(&registry, "bad_claims"), 4);
}

#[test]
fn the_key_survives_a_restart() {
    let (first, _, dir) = fresh();
    let kid = first.keys().signer().kid.clone();
    let token = first.issue(&acme(), &tv(), "http").unwrap().token;
    let jwks = first.jwks();
    drop(first);

    let (second, _) = test_vendor(dir.path(), |_| {});
    assert_eq!(second.keys().signer().kid, kid);
    assert_eq!(second.jwks(), jwks);
    assert_eq!(second.verify(&token).unwrap().account.as_str(), "acme");
    let path = keys::key_dir(dir.path()).join(format!("{kid}.json"));
    assert!(path.is_file());
}

#[test]
fn an_older_key_keeps_verifying_after_a_newer_one_appears() {
    let (first, _, dir) = fresh();
    let old_kid = first.keys().signer().kid.clone();
    let old_token = first.issue(&acme(), &tv(), "http").unwrap().token;

    let newer = keys::KeyPair::from_seed([42; 32], now_millis() + 1_000).unwrap();
    keys::save(&keys::key_dir(dir.path()), &newer).unwrap();
    let (second, _) = test_vendor(dir.path(), |_| {});
    assert_eq!(second.keys().signer().kid, newer.kid);
    assert!(second.verify(&old_token).is_ok());
    let new_token = second.issue(&acme(), &tv(), "http").unwrap().token;
    assert_eq!(
        jsonwebtoken::decode_header(&new_token)
            .unwrap()
            .kid
            .as_deref(),
        Some(newer.kid.as_str())
    );
    let jwks = second.jwks();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, [newer.kid.as_str(), old_kid.as_str()]);
}

#[test]
fn a_key_from_the_environment_signs() {
    let dir = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let vendor =
        Vendor::build(Config::new(dir.path(), "k"), &registry, Some([5; 32]), None).unwrap();
    let expected = keys::KeyPair::from_seed([5; 32], 0).unwrap();
    let jwks = vendor.jwks();
    assert_eq!(jwks["keys"][0]["kid"], expected.kid.as_str());
    assert_eq!(
        jwks["keys"][0]["x"],
        URL_SAFE_NO_PAD.encode(expected.public)
    );
    let token = vendor.issue(&acme(), &tv(), "nats").unwrap().token;
    assert!(vendor.verify(&token).is_ok());
}

#[test]
fn jwks_lists_the_public_key() {
    let (vendor, _, _dir) = fresh();
    let keys = vendor.keys();
    let signer = keys.signer();
    assert_eq!(
        vendor.jwks(),
        json!({"keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": "EdDSA",
            "use": "sig",
            "kid": signer.kid,
            "x": URL_SAFE_NO_PAD.encode(signer.public),
        }]})
    );
}

#[test]
fn one_registry_holds_one_vendor() {
    let dir = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    Vendor::build(Config::new(dir.path(), "k"), &registry, None, None).unwrap();
    assert!(Vendor::build(Config::new(dir.path(), "k"), &registry, None, None).is_err());
}

#[test]
fn metric_series_exist_from_the_start() {
    let (_vendor, registry, _dir) = fresh();
    let families = registry.gather();
    let series = |name: &str| {
        families
            .iter()
            .find(|f| f.name() == name)
            .map(|f| f.get_metric().len())
            .unwrap_or(0)
    };
    assert_eq!(series("headcount_tokens_issued_total"), 6);
    assert_eq!(series("headcount_token_requests_rejected_total"), 3);
    assert_eq!(
        series("headcount_token_verifications_total"),
        1 + TokenError::ALL.len()
    );
}

#[test]
fn operator_key_comparison() {
    let dir = tempfile::tempdir().unwrap();
    let (vendor, _) = test_vendor(dir.path(), |c| c.operator_key = "s3cret".into());
    assert!(vendor.is_operator_key("s3cret"));
    for wrong in ["", "s3cre", "s3cret ", "S3cret", "s3cretx"] {
        assert!(!vendor.is_operator_key(wrong), "{wrong:?}");
    }
    let (open, _) = test_vendor(dir.path(), |c| c.operator_key = String::new());
    assert!(!open.is_operator_key(""));
}

#[test]
fn error_kinds_are_distinct_snake_case() {
    let kinds: std::collections::HashSet<&str> = TokenError::ALL.iter().map(|e| e.kind()).collect();
    assert_eq!(kinds.len(), TokenError::ALL.len());
    assert!(
        kinds
            .iter()
            .all(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    );
    assert!(!kinds.contains("ok"));
}

#[test]
fn session_ids_are_valid_names() {
    for _ in 0..100 {
        assert!(SessionId::parse(&new_session_id()).is_ok());
    }
}

/// Session ids and operator inbox prefixes come from the OS random source:
/// one tells nothing about the next (NUIDs shared 12 characters).
#[test]
fn issued_session_ids_and_operator_sids_are_unguessable() {
    let (vendor, _, _dir) = fresh();
    let common = |a: &str, b: &str| a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let sessions: Vec<String> = (0..200)
        .map(|_| {
            vendor
                .issue(&acme(), &tv(), "http")
                .unwrap()
                .session
                .to_string()
        })
        .collect();
    for pair in sessions.windows(2) {
        assert_eq!(pair[0].len(), SESSION_ID_CHARS);
        assert!(common(&pair[0], &pair[1]) < 8, "{pair:?}");
    }
    let prefixes: Vec<String> = (0..200)
        .map(|_| vendor.issue_operator().unwrap().inbox_prefix)
        .collect();
    for pair in prefixes.windows(2) {
        let sid = pair[0].strip_prefix("_INBOX_").unwrap();
        assert_eq!(sid.len(), OPERATOR_SID_CHARS);
        // One subject token: letters and digits only.
        assert!(sid.bytes().all(|b| b.is_ascii_alphanumeric()), "{sid}");
        let next = pair[1].strip_prefix("_INBOX_").unwrap();
        assert!(common(sid, next) < 8, "{pair:?}");
    }
}
