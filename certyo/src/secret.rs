//! Keeping the API key out of text that is stored or logged: Certyo's answers (an error body
//! that echoes the `X-API-Key` it was sent), error messages, log lines. One function masks it,
//! for the client, the extension's stored errors and its log hook alike.

/// A secret shorter than this is not masked: masking two or three characters wherever they
/// appear would garble every message, and no API key is that short.
pub const MIN_SECRET_LEN: usize = 4;

/// `text` with every copy of `secret` replaced by as many `*`: the secret as written, and as
/// JSON escapes it inside a string (a body that quotes the key it received). Text is never made
/// longer, so the log hook can do the same in place ([`mask_secret_in_place`]).
pub fn mask_secret(text: &str, secret: &str) -> String {
    let mut bytes = text.as_bytes().to_vec();
    mask_secret_in_place(&mut bytes, secret);
    // Only whole copies of the secret (whole UTF-8 sequences) became ASCII: still UTF-8.
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// [`mask_secret`] on bytes, in place.
pub fn mask_secret_in_place(text: &mut [u8], secret: &str) {
    if secret.len() < MIN_SECRET_LEN {
        return;
    }
    mask_occurrences(text, secret.as_bytes());
    // As a JSON string holds it: quotes, backslashes and control characters escaped.
    let escaped = serde_json::to_string(secret).unwrap_or_default();
    let escaped = escaped
        .strip_prefix('"')
        .and_then(|e| e.strip_suffix('"'))
        .unwrap_or_default();
    if escaped != secret && escaped.len() >= MIN_SECRET_LEN {
        mask_occurrences(text, escaped.as_bytes());
    }
}

fn mask_occurrences(text: &mut [u8], secret: &[u8]) {
    let mut at = 0;
    while at + secret.len() <= text.len() {
        if &text[at..at + secret.len()] == secret {
            text[at..at + secret.len()].fill(b'*');
            at += secret.len();
        } else {
            at += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_copy_of_the_secret_is_masked_and_nothing_else() {
        assert_eq!(
            mask_secret("bad key KEY123, again KEY123!", "KEY123"),
            "bad key ******, again ******!"
        );
        assert_eq!(mask_secret("nothing here", "KEY123"), "nothing here");
        assert_eq!(
            mask_secret("ünïcode KEY123 ü", "KEY123"),
            "ünïcode ****** ü"
        );
    }

    #[test]
    fn the_secret_as_json_escapes_it_is_masked_too() {
        let secret = r#"k"ey\12"#;
        let body = serde_json::json!({"error": format!("bad key {secret}")}).to_string();
        assert!(body.contains(r#"k\"ey\\12"#), "{body}");
        let masked = mask_secret(&body, secret);
        assert!(!masked.contains(r#"k\"ey\\12"#), "{masked}");
        assert!(masked.contains("bad key ********"), "{masked}");
    }

    #[test]
    fn secrets_too_short_to_be_keys_are_left_alone() {
        assert_eq!(mask_secret("a b c", "a"), "a b c");
        assert_eq!(mask_secret("", ""), "");
    }
}
