//! The Certyo API key: where it comes from, and keeping it out of the server log.
//!
//! `certyo.api_key_file` (recommended) names a file only the server's OS user can read, as
//! `ssl_key_file` does; the key never passes through a setting, a statement or the log. With
//! `certyo.api_key` the key is a setting, which PostgreSQL itself would print on every reload
//! that changes it (`parameter "certyo.api_key" changed to "..."`) and in any logged statement
//! that sets it; a log hook, installed in every process that loads the library (the postmaster
//! included, when preloaded), removes it from such messages before they are written.

use pgrx::pg_sys;
use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::os::unix::fs::MetadataExt;

thread_local! {
    /// The file last read, and what it gave: read once, again after a reload.
    static FROM_FILE: RefCell<Option<(String, Result<String, String>)>> = const { RefCell::new(None) };
}

/// The key to send: from `file` when it is set, else `setting`. Err says why the file cannot
/// be used (never containing the key).
pub fn current(file: &str, setting: &str) -> Result<String, String> {
    if file.is_empty() {
        return Ok(setting.to_string());
    }
    FROM_FILE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((path, key)) = cache.as_ref() {
            if path == file {
                return key.clone();
            }
        }
        let key = read(file);
        *cache = Some((file.to_string(), key.clone()));
        key
    })
}

/// After a configuration reload: read the file again (it may have been rotated).
pub fn forget() {
    FROM_FILE.with(|cache| cache.borrow_mut().take());
}

/// The key in `path`, which must be owned by the server's OS user (or root) and closed to
/// others, as PostgreSQL requires of `ssl_key_file`.
fn read(path: &str) -> Result<String, String> {
    let cannot = |e: std::io::Error| format!("certyo.api_key_file: cannot read {path}: {e}");
    let meta = std::fs::metadata(path).map_err(cannot)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let server_user = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o777;
    let too_open = if meta.uid() == 0 {
        mode & 0o037 != 0
    } else {
        mode & 0o077 != 0
    };
    if meta.uid() != server_user && meta.uid() != 0 {
        return Err(format!(
            "certyo.api_key_file: {path} must be owned by the server's OS user or root"
        ));
    }
    if too_open {
        return Err(format!(
            "certyo.api_key_file: {path} has permissions {mode:o}; it must not be readable by other users (chmod 600 {path})"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(cannot)?;
    let key = text.trim();
    if key.is_empty() {
        return Err(format!("certyo.api_key_file: {path} is empty"));
    }
    Ok(key.to_string())
}

static mut PREVIOUS_HOOK: pg_sys::emit_log_hook_type = None;

/// Install the log hook (from `_PG_init`, once per process).
pub fn redact_from_log() {
    // SAFETY: `_PG_init` runs once per process, in its main thread, before any log message of
    // ours; the previous hook is kept and called, as the hook protocol asks.
    unsafe {
        PREVIOUS_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(on_log);
    }
}

/// Called by PostgreSQL for every message about to be logged. It must never raise an error
/// (it runs inside error reporting): it only reads, and edits the message text in place,
/// never making it longer, so it allocates nothing in Postgres.
unsafe extern "C-unwind" fn on_log(edata: *mut pg_sys::ErrorData) {
    if !edata.is_null() {
        // A panic here must not unwind into error reporting: a failed redaction hides the
        // whole message instead.
        // SAFETY: `edata` is the non-null ErrorData Postgres passes the hook, alive for the call.
        let redacted = std::panic::catch_unwind(|| unsafe {
            redact(&mut *edata, super::settings::api_key_setting())
        });
        if redacted.is_err() {
            (*edata).output_to_server = false;
        }
    }
    // SAFETY: the hook that was installed before ours, called as PostgreSQL would.
    if let Some(previous) = unsafe { PREVIOUS_HOOK } {
        unsafe { previous(edata) };
    }
}

const NAME: &str = "certyo.api_key";

unsafe fn redact(edata: &mut pg_sys::ErrorData, key: Option<String>) {
    let statement = pg_sys::debug_query_string;
    if !statement.is_null() && mentions_key(&CStr::from_ptr(statement).to_string_lossy()) {
        edata.hide_stmt = true;
    }
    for field in [
        edata.message,
        edata.detail,
        edata.hint,
        edata.context,
        edata.internalquery,
    ] {
        if !field.is_null() {
            redact_in_place(field, key.as_deref());
        }
    }
}

/// Overwrite, in the C string `text`, every occurrence of the key, and whatever follows a
/// mention of `certyo.api_key` (a statement that sets it, the reload message).
unsafe fn redact_in_place(text: *mut c_char, key: Option<&str>) {
    let bytes = std::slice::from_raw_parts_mut(text.cast::<u8>(), libc::strlen(text));
    if let Some(key) = key.filter(|k| k.len() >= 4) {
        mask_occurrences(bytes, key.as_bytes());
    }
    if let Some(cut) = after_mention(bytes) {
        let marker = b" [redacted]";
        let written = marker.len().min(bytes.len() - cut);
        bytes[cut..cut + written].copy_from_slice(&marker[..written]);
        if cut + written < bytes.len() {
            bytes[cut + written] = 0;
        }
    }
}

fn mask_occurrences(text: &mut [u8], key: &[u8]) {
    let mut at = 0;
    while at + key.len() <= text.len() {
        if &text[at..at + key.len()] == key {
            text[at..at + key.len()].fill(b'*');
            at += key.len();
        } else {
            at += 1;
        }
    }
}

/// Where the value begins after a mention of the setting that assigns it (`certyo.api_key =
/// ...`, `SET certyo.api_key TO ...`, `set_config('certyo.api_key', ...`, the reload message
/// `parameter "certyo.api_key" changed to ...`), if the text has one. A mere mention (our own
/// messages name the setting) and `certyo.api_key_file` are left alone.
fn after_mention(text: &[u8]) -> Option<usize> {
    let name = NAME.as_bytes();
    (0..text.len().saturating_sub(name.len() - 1)).find_map(|at| {
        let end = at + name.len();
        let next = text.get(end).map(u8::to_ascii_lowercase);
        if !text[at..end].eq_ignore_ascii_case(name)
            || matches!(next, Some(b'_' | b'a'..=b'z' | b'0'..=b'9'))
        {
            return None;
        }
        let mut cut = end;
        if text[cut..].starts_with(b"\" changed") {
            cut += b"\" changed".len();
        }
        let rest = &text[cut..];
        let value = rest
            .iter()
            .position(|b| !matches!(b, b' ' | b'"' | b'\'' | b'\t' | b'\n'))
            .map(|skip| &rest[skip..])?;
        let assigns = value.starts_with(b"=")
            || value.starts_with(b",")
            || (value.len() > 2
                && value[..2].eq_ignore_ascii_case(b"to")
                && !value[2].is_ascii_alphanumeric());
        assigns.then_some(cut)
    })
}

fn mentions_key(statement: &str) -> bool {
    after_mention(statement.as_bytes()).is_some()
}

#[cfg(test)]
mod tests {
    use super::{after_mention, mask_occurrences};

    fn redacted(message: &str, key: &str) -> String {
        let mut bytes = message.as_bytes().to_vec();
        bytes.push(0);
        // SAFETY: `bytes` is a live NUL-terminated buffer.
        unsafe { super::redact_in_place(bytes.as_mut_ptr().cast(), Some(key)) };
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }

    #[test]
    fn the_reload_message_says_the_key_changed_not_to_what() {
        assert_eq!(
            redacted(
                r#"parameter "certyo.api_key" changed to "s3cret-value-123""#,
                "s3cret-value-123"
            ),
            r#"parameter "certyo.api_key" changed [redacted]"#
        );
    }

    #[test]
    fn statements_that_set_the_key_lose_the_value() {
        let out = redacted(
            "statement: ALTER SYSTEM SET CERTYO.API_KEY = 'new-key-987'",
            "old-key",
        );
        assert!(!out.contains("new-key-987"), "{out}");
        assert_eq!(out, "statement: ALTER SYSTEM SET CERTYO.API_KEY [redacted]");
    }

    #[test]
    fn the_key_file_setting_and_other_text_stay_readable() {
        let message = r#"parameter "certyo.api_key_file" changed to "/etc/certyo/key""#;
        assert_eq!(after_mention(message.as_bytes()), None);
        assert_eq!(redacted(message, "unrelated-key"), message);
        let ours =
            "Certyo refused the API key: fix certyo.api_key_file (or certyo.api_key) and reload";
        assert_eq!(redacted(ours, "unrelated-key"), ours);
        let function = "SELECT set_config('certyo.api_key', 'k-123456', false)";
        assert_eq!(
            redacted(function, "other"),
            "SELECT set_config('certyo.api_key [redacted]"
        );
    }

    #[test]
    fn the_key_itself_is_masked_wherever_it_appears() {
        let mut text = b"abc KEY123 def KEY123".to_vec();
        mask_occurrences(&mut text, b"KEY123");
        assert_eq!(text, b"abc ****** def ******");
        assert_eq!(redacted("tiny", "KEY123"), "tiny");
    }
}
