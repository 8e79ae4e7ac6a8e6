//! The Certyo API key: where it comes from, and keeping it out of the server log and of
//! everything the worker stores.
//!
//! `certyo.api_key_file` (recommended) names a regular file only the server's OS user can read,
//! as `ssl_key_file` does; the key never passes through a setting, a statement or the log. With
//! `certyo.api_key` the key is a setting, which PostgreSQL itself would print on every reload
//! that changes it (`parameter "certyo.api_key" changed to "..."`) and in any logged statement
//! that sets it; a log hook, installed in every process that loads the library (the postmaster
//! included, when preloaded), removes it from such messages before they are written, however
//! the statement spells the setting. Whichever way the key came, [`masked`] takes it out of
//! the error texts the worker stores (Certyo's answers may quote it), and the log hook out of
//! every message of the process.

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

/// The largest key file read: a key is a line of text, and a file the size of the disk must
/// not fill the worker's memory.
const MAX_FILE_SIZE: u64 = 64 * 1024;

/// The key in `path`, which must be a regular file owned by the server's OS user (or root) and
/// closed to others, as PostgreSQL requires of `ssl_key_file`. Anything else (a FIFO, whose
/// read would wait for a writer forever; a device; a directory) is refused before it is opened,
/// and again by what the opened descriptor is, in case the path was swapped meanwhile.
fn read(path: &str) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |e: std::io::Error| format!("certyo.api_key_file: cannot read {path}: {e}");
    check_file(path, &std::fs::metadata(path).map_err(cannot)?)?;
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(cannot)?;
    check_file(path, &file.metadata().map_err(cannot)?)?;
    let mut text = String::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    let key = text.trim();
    if key.is_empty() {
        return Err(format!("certyo.api_key_file: {path} is empty"));
    }
    Ok(key.to_string())
}

/// Whether the file behind `meta` may hold the key: Err says why not.
fn check_file(path: &str, meta: &std::fs::Metadata) -> Result<(), String> {
    if !meta.file_type().is_file() {
        return Err(format!(
            "certyo.api_key_file: {path} is not a regular file (a FIFO, a device or a directory, say); name a file that holds the key"
        ));
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(format!(
            "certyo.api_key_file: {path} is larger than {MAX_FILE_SIZE} bytes; it must hold only the key"
        ));
    }
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
    Ok(())
}

/// The keys this process knows: `certyo.api_key`, and in the delivery worker the key it read
/// from `certyo.api_key_file`. Never fails: a cache in use (it is not, where the log hook
/// runs) is skipped.
fn known_keys() -> Vec<String> {
    let mut keys: Vec<String> = KEY_SETTING
        .get()
        .and_then(|setting| setting())
        .into_iter()
        .collect();
    let read = FROM_FILE.try_with(|cache| {
        cache
            .try_borrow()
            .ok()
            .and_then(|cache| match cache.as_ref() {
                Some((_, Ok(key))) => Some(key.clone()),
                _ => None,
            })
    });
    // Err: the thread is ending, its cache gone; nothing read from a file is left to mask.
    if let Ok(Some(key)) = read {
        keys.push(key);
    }
    keys
}

/// `text` with the API key masked (`certyo::mask_secret`), whichever way it was configured:
/// for every error text stored where `certyo.worker_status()`, `certyo.status` or
/// `certyo.history()` show it, and every message logged.
pub fn masked(text: &str) -> String {
    known_keys().iter().fold(text.to_string(), |text, key| {
        certyo::mask_secret(&text, key)
    })
}

static mut PREVIOUS_HOOK: pg_sys::emit_log_hook_type = None;

/// Reads the value of `certyo.api_key` (None when it is not set), handed over by whoever
/// installs the log hook: this module knows no settings of its own.
static KEY_SETTING: std::sync::OnceLock<fn() -> Option<String>> = std::sync::OnceLock::new();

/// Install the log hook (from `_PG_init`, once per process); `key_setting` reads the value of
/// `certyo.api_key`, which the hook keeps out of the log.
pub fn redact_from_log(key_setting: fn() -> Option<String>) {
    // Once per process: a second call (there is none) would keep the first getter.
    KEY_SETTING.get_or_init(|| key_setting);
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
///
/// # Safety
/// Called only by PostgreSQL, as its `emit_log_hook`, in the process's main thread: `edata`
/// is null or the ErrorData being reported, alive for the call.
unsafe extern "C-unwind" fn on_log(edata: *mut pg_sys::ErrorData) {
    if !edata.is_null() {
        // A panic here must not unwind into error reporting: a failed redaction hides the
        // whole message instead.
        // SAFETY: `edata` is the non-null ErrorData Postgres passes the hook, alive for the call.
        let redacted = std::panic::catch_unwind(|| unsafe { redact(&mut *edata, &known_keys()) });
        if redacted.is_err() {
            // SAFETY: as above; a plain field write.
            unsafe { (*edata).output_to_server = false };
        }
    }
    // SAFETY: the hook that was installed before ours, called as PostgreSQL would.
    if let Some(previous) = unsafe { PREVIOUS_HOOK } {
        // SAFETY: as above, with the ErrorData PostgreSQL passed us.
        unsafe { previous(edata) };
    }
}

/// Remove the key from a message about to be logged. The statement being run may set the key
/// in any spelling the server's parser accepts (`certyo.api_key`, `"certyo"."api_key"`,
/// `CERTYO . /* */ API_KEY`, `set_config('certyo.api_key', ...)`, `ALTER SYSTEM`, `ALTER
/// DATABASE`, `ALTER ROLE`, `SET ... TO`), or fail to parse: whenever it, or the message,
/// mentions the setting (see [`suspect`]), the statement is not appended to the message, and
/// every field loses the contents of its string literals and every value the statement held
/// after the mention; a field that assigns the setting is cut after its name. The keys this
/// process knows are masked in every message.
///
/// # Safety
/// In the log hook ([`on_log`]), in the process's main thread: `edata` is the ErrorData being
/// reported, its text fields null or NUL-terminated strings that may be edited in place.
unsafe fn redact(edata: &mut pg_sys::ErrorData, keys: &[String]) {
    let fields = [
        edata.message,
        edata.detail,
        edata.detail_log,
        edata.hint,
        edata.context,
        edata.internalquery,
    ];
    let text_of = |text: *const c_char| -> &[u8] {
        if text.is_null() {
            &[]
        } else {
            // SAFETY: a NUL-terminated string of the ErrorData, or debug_query_string, both
            // alive for the duration of the hook.
            unsafe { CStr::from_ptr(text) }.to_bytes()
        }
    };
    // SAFETY: debug_query_string is set by the process's main thread, which runs this hook; it
    // is NULL or the statement being run, alive until the next one.
    let statement = text_of(unsafe { pg_sys::debug_query_string });
    let internal = text_of(edata.internalquery);
    let suspected = suspect(statement) || fields.iter().any(|field| suspect(text_of(*field)));
    let mut values = Vec::new();
    if suspected {
        edata.hide_stmt = true;
        values = values_in(statement);
        values.extend(values_in(internal));
    }
    for field in fields.into_iter().filter(|field| !field.is_null()) {
        // SAFETY: each field is a NUL-terminated string palloc'd for this ErrorData, not
        // shared with another field, and edited in place without growing.
        let text =
            unsafe { std::slice::from_raw_parts_mut(field.cast::<u8>(), libc::strlen(field)) };
        redact_text(text, keys, suspected.then_some(values.as_slice()));
    }
}

/// Redact one NUL-terminated text in place, never making it longer (a cut ends it with a NUL
/// inside `text`). `values`: the statement mentions the setting, and these are its values.
fn redact_text(text: &mut [u8], keys: &[String], values: Option<&[Vec<u8>]>) {
    for key in keys {
        certyo::mask_secret_in_place(text, key);
    }
    let cut = assignment(text);
    if let Some(values) = values {
        // Up to the mention that is cut, or everything: the literals' contents, and the values.
        let (end, whole) = cut.map_or((text.len(), true), |(start, _)| (start, false));
        mask_literals(&mut text[..end], whole);
        for value in values {
            mask_bytes(&mut text[..end], value);
        }
    }
    if let Some((_, cut)) = cut {
        let marker = b" [redacted]";
        let written = marker.len().min(text.len() - cut);
        text[cut..cut + written].copy_from_slice(&marker[..written]);
        if cut + written < text.len() {
            text[cut + written] = 0;
        }
    }
}

/// Overwrite every copy of `value` in `text` with `*`: bytes, not UTF-8, since the statement
/// and the messages are in the server's encoding.
fn mask_bytes(text: &mut [u8], value: &[u8]) {
    let mut at = 0;
    while !value.is_empty() && at + value.len() <= text.len() {
        if &text[at..at + value.len()] == value {
            text[at..at + value.len()].fill(b'*');
            at += value.len();
        } else {
            at += 1;
        }
    }
}

/// SQL text read the way the server's lexer reads it, one significant byte at a time:
/// lowercased, without white space, comments, and the quotes around quoted identifiers,
/// string literals and dollar-quoted strings (whose contents are kept). Each byte comes with
/// its offset.
struct Significant<'a> {
    text: &'a [u8],
    at: usize,
    quote: Quote,
}

#[derive(Clone, Copy)]
enum Quote {
    None,
    Single,
    Double,
    /// A dollar-quoted string: where its opening tag is, and its length.
    Dollar(usize, usize),
}

impl<'a> Significant<'a> {
    fn new(text: &'a [u8]) -> Self {
        Significant {
            text,
            at: 0,
            quote: Quote::None,
        }
    }
}

/// The length of the dollar-quote tag (`$$`, `$name$`) at the start of `text`, if one is.
fn dollar_tag(text: &[u8]) -> Option<usize> {
    if text.first() != Some(&b'$') {
        return None;
    }
    let name = text[1..]
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_' || **b >= 0x80)
        .count();
    let starts_with_digit = text.get(1).is_some_and(u8::is_ascii_digit);
    (text.get(1 + name) == Some(&b'$') && !starts_with_digit).then_some(name + 2)
}

impl Iterator for Significant<'_> {
    type Item = (u8, usize);

    fn next(&mut self) -> Option<(u8, usize)> {
        let text = self.text;
        loop {
            let at = self.at;
            let byte = *text.get(at)?;
            let next = text.get(at + 1).copied();
            match self.quote {
                Quote::None => {
                    if byte.is_ascii_whitespace() {
                        self.at += 1;
                    } else if byte == b'-' && next == Some(b'-') {
                        self.at = text[at..]
                            .iter()
                            .position(|b| *b == b'\n')
                            .map_or(text.len(), |n| at + n);
                    } else if byte == b'/' && next == Some(b'*') {
                        let mut depth = 0usize;
                        let mut i = at;
                        while i < text.len() {
                            if text[i..].starts_with(b"/*") {
                                depth += 1;
                                i += 2;
                            } else if text[i..].starts_with(b"*/") {
                                depth -= 1;
                                i += 2;
                                if depth == 0 {
                                    break;
                                }
                            } else {
                                i += 1;
                            }
                        }
                        self.at = i;
                    } else if byte == b'\'' {
                        self.quote = Quote::Single;
                        self.at += 1;
                    } else if byte == b'"' {
                        self.quote = Quote::Double;
                        self.at += 1;
                    } else if let Some(len) = dollar_tag(&text[at..]) {
                        self.quote = Quote::Dollar(at, len);
                        self.at += len;
                    } else {
                        self.at += 1;
                        return Some((byte.to_ascii_lowercase(), at));
                    }
                }
                Quote::Single | Quote::Double => {
                    let quote = if matches!(self.quote, Quote::Single) {
                        b'\''
                    } else {
                        b'"'
                    };
                    if byte == quote && next == Some(quote) {
                        self.at += 2;
                        return Some((quote, at));
                    }
                    self.at += 1;
                    if byte == quote {
                        self.quote = Quote::None;
                    } else {
                        return Some((byte.to_ascii_lowercase(), at));
                    }
                }
                Quote::Dollar(tag, len) => {
                    if text[at..].starts_with(&text[tag..tag + len]) {
                        self.at += len;
                        self.quote = Quote::None;
                    } else {
                        self.at += 1;
                        return Some((byte.to_ascii_lowercase(), at));
                    }
                }
            }
        }
    }
}

/// Significant bytes allowed between `api` and `key` in a mention: `api_key`, and its spellings
/// that escape or split the underscore (`api\x5fkey`, `api' || '_key`).
const GAP: usize = 8;

/// Where each mention of the API key setting begins and ends in `text`: `api` then `key`
/// (with at most [`GAP`] significant bytes between, and not followed by more of a name, as in
/// `certyo.api_key_file`), or a Unicode-escaped name or string (`U&"..."`, which can spell
/// anything). Deliberately broad: the setting's name is never needed to find a mention.
fn mentions(text: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut recent: [(u8, usize); GAP + 6] = [(0, 0); GAP + 6];
    let mut seen = 0usize;
    Significant::new(text).filter_map(move |(byte, at)| {
        let size = recent.len();
        recent[seen % size] = (byte, at);
        seen += 1;
        let back = |n: usize| (n < seen).then(|| recent[(seen - 1 - n) % size]);
        let last = |n: usize| back(n).map_or(0, |(b, _)| b);
        if byte == b'&' && last(1) == b'u' && matches!(text.get(at + 1), Some(b'"' | b'\'')) {
            return back(1).map(|(_, start)| (start, at + 1));
        }
        if (last(2), last(1), byte) != (b'k', b'e', b'y') {
            return None;
        }
        if text
            .get(at + 1)
            .is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$'))
        {
            return None; // `api_key_file`, `api_keys`
        }
        (3..=3 + GAP).find_map(|n| {
            let (i, p, a) = (back(n)?, back(n + 1)?, back(n + 2)?);
            ((a.0, p.0, i.0) == (b'a', b'p', b'i')).then_some((a.1, at + 1))
        })
    })
}

/// Whether `text` (a statement, or a message) may set the key: it mentions the setting (see
/// [`mentions`]), or it names `certyo` and builds text in a way that could spell the setting's
/// name unseen (escapes, concatenation, `chr`, `format`).
fn suspect(text: &[u8]) -> bool {
    if mentions(text).next().is_some() {
        return true;
    }
    let lower = text.to_ascii_lowercase();
    let has = |needle: &[u8]| lower.windows(needle.len()).any(|w| w == needle);
    has(b"certyo")
        && (lower.contains(&b'\\')
            || has(b"||")
            || has(b"concat")
            || has(b"chr(")
            || has(b"format("))
}

/// A mention of the setting that gives it a value (`certyo.api_key = ...`, `... TO ...`,
/// `set_config('certyo.api_key', ...`, `'certyo.api_key'::text`, the reload message
/// `parameter "certyo.api_key" changed to ...`): where the mention starts, and where the text
/// is cut (after the name, or after `changed`). A mere mention, as in our own messages, is not.
fn assignment(text: &[u8]) -> Option<(usize, usize)> {
    mentions(text).find_map(|(start, end)| {
        // Past the quote that closes a quoted name, if one does.
        let rest = end
            + text[end..]
                .iter()
                .take_while(|b| matches!(b, b'"' | b'\''))
                .count();
        let mut after = Significant::new(&text[rest..]);
        let (first, at) = after.next()?;
        let second = after.next().map(|(b, _)| b);
        match (first, second) {
            (b'=' | b',', _) | (b't', Some(b'o')) | (b':', Some(b':')) | (b'|', Some(b'|')) => {
                Some((start, end))
            }
            (b'c', Some(b'h')) if text[rest + at..].starts_with(b"changed") => {
                Some((start, rest + at + b"changed".len()))
            }
            _ => None,
        }
    })
}

/// Mask the contents of the string literals in `text` ('...', with '' inside, and dollar-quoted):
/// the value a statement gives the setting, whatever follows, and the parameters a message
/// shows (`$1 = '...'`). `unterminated`: mask a literal that runs to the end too.
fn mask_literals(text: &mut [u8], unterminated: bool) {
    let mut at = 0;
    while at < text.len() {
        let (open, close) = match dollar_tag(&text[at..]) {
            Some(len) => (len, text[at..at + len].to_vec()),
            None if text[at] == b'\'' => (1, b"'".to_vec()),
            None => {
                at += 1;
                continue;
            }
        };
        let start = at + open;
        let mut end = start;
        let mut closed = false;
        while end < text.len() {
            if text[end..].starts_with(&close) {
                if close == b"'" && text.get(end + 1) == Some(&b'\'') {
                    end += 2;
                    continue;
                }
                closed = true;
                break;
            }
            end += 1;
        }
        if closed || unterminated {
            text[start..end].fill(b'*');
        }
        at = if closed {
            end + close.len()
        } else {
            end.max(at + 1)
        };
    }
}

/// What a statement that mentions the setting may hold as its value, to be masked wherever a
/// message repeats it (`syntax error at or near "..."`, `column "..." does not exist`, in any
/// language): the contents of its string literals, and every word after the first mention.
/// Only values of at least 4 bytes, and none that mentions the setting itself.
fn values_in(statement: &[u8]) -> Vec<Vec<u8>> {
    let Some((_, end)) = mentions(statement).next() else {
        return Vec::new();
    };
    let mut values = Vec::new();
    let mut literals = statement.to_vec();
    mask_literals(&mut literals, true);
    let mut at = 0;
    while at < statement.len() {
        if literals[at] == b'*' && statement[at] != b'*' {
            let len = literals[at..].iter().take_while(|b| **b == b'*').count();
            values.push(statement[at..at + len].to_vec());
            at += len;
        } else {
            at += 1;
        }
    }
    let separator = |b: &u8| {
        b.is_ascii_whitespace() || matches!(b, b'\'' | b'"' | b',' | b'(' | b')' | b';' | b'=')
    };
    values.extend(statement[end..].split(separator).map(<[u8]>::to_vec));
    values.retain(|v| {
        v.len() >= certyo::MIN_SECRET_LEN && mentions(v).next().is_none() && !is_keyword(v)
    });
    values.sort();
    values.dedup();
    values.truncate(64);
    values
}

/// Words of the statements that set a setting: masking them would garble messages and hide
/// no value.
fn is_keyword(word: &[u8]) -> bool {
    [
        &b"false"[..],
        b"true",
        b"local",
        b"session",
        b"default",
        b"from",
        b"current",
    ]
    .iter()
    .any(|k| word.eq_ignore_ascii_case(k))
}

#[cfg(test)]
mod tests {
    use super::{assignment, read, redact_text, suspect, values_in};
    use std::os::unix::fs::PermissionsExt;

    /// A path of its own in the temporary directory.
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("certyo-api-key-{}-{name}", std::process::id()));
        let _absent = std::fs::remove_dir_all(&dir); // left by an earlier run, or not there
        std::fs::create_dir(&dir).expect("a scratch directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod 700");
        dir
    }

    #[test]
    fn the_key_file_must_be_a_regular_file_of_a_key() {
        let dir = scratch("files");
        let good = dir.join("key");
        std::fs::write(&good, "  k-123456\n").expect("write");
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            read(good.to_str().expect("utf-8")),
            Ok("k-123456".to_string())
        );

        let fifo = dir.join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("no NUL");
        // SAFETY: a NUL-terminated path; mkfifo only creates the file.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo");
        // Returns at once (open or read would wait for a writer forever), saying why.
        let (tell, answer) = std::sync::mpsc::channel();
        let path = fifo.to_str().expect("utf-8").to_string();
        std::thread::spawn(move || tell.send(read(&path)));
        let refused = answer
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("read() returns on a FIFO")
            .expect_err("a FIFO is refused");
        assert!(refused.contains("is not a regular file"), "{refused}");

        let refused = read(dir.to_str().expect("utf-8")).expect_err("a directory is refused");
        assert!(refused.contains("is not a regular file"), "{refused}");

        let large = dir.join("large");
        std::fs::write(&large, vec![b'k'; 70 * 1024]).expect("write");
        std::fs::set_permissions(&large, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let refused = read(large.to_str().expect("utf-8")).expect_err("a large file is refused");
        assert!(refused.contains("larger than"), "{refused}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    /// What the log hook makes of `message`, logged while `statement` runs, in a process that
    /// knows `key`.
    fn logged(message: &str, statement: &str, key: &str) -> String {
        let mut bytes = message.as_bytes().to_vec();
        let suspected = suspect(statement.as_bytes()) || suspect(message.as_bytes());
        let values = values_in(statement.as_bytes());
        redact_text(
            &mut bytes,
            &[key.to_string()],
            suspected.then_some(values.as_slice()),
        );
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }

    /// What the log hook makes of `statement: ...` for a statement with the secret in it.
    fn statement_logged(statement: &str) -> String {
        logged(
            &format!("statement: {statement}"),
            statement,
            "unrelated-key",
        )
    }

    const SECRET: &str = "sk_live_0123456789";

    #[test]
    fn the_reload_message_says_the_key_changed_not_to_what() {
        assert_eq!(
            logged(
                r#"parameter "certyo.api_key" changed to "s3cret-value-123""#,
                "",
                "s3cret-value-123"
            ),
            r#"parameter "certyo.api_key" changed [redacted]"#
        );
        // From a process that does not know the new key yet.
        assert_eq!(
            logged(
                r#"parameter "certyo.api_key" changed to "new-one-456""#,
                "",
                "old-one"
            ),
            r#"parameter "certyo.api_key" changed [redacted]"#
        );
    }

    #[test]
    fn every_spelling_of_a_statement_that_sets_the_key_loses_the_value() {
        for statement in [
            "ALTER SYSTEM SET certyo.api_key = '{}'",
            "ALTER SYSTEM SET CERTYO.API_KEY = '{}'",
            "ALTER SYSTEM SET certyo . api_key = '{}'",
            "ALTER SYSTEM SET \"certyo\".\"api_key\" = '{}'",
            "ALTER SYSTEM SET \"CERTYO\" . \"API_KEY\" TO '{}'",
            "ALTER SYSTEM SET certyo/**/.api_key = '{}'",
            "ALTER SYSTEM SET certyo/* a /* nested */ comment */.api_key/**/='{}'",
            "ALTER SYSTEM SET certyo -- a comment\n .api_key\n TO\n '{}'",
            "alter system set certyo.api_key to {}",
            "ALTER SYSTEM SET certyo.api_key = E'{}'",
            "ALTER SYSTEM SET certyo.api_key = $${}$$",
            "ALTER SYSTEM SET certyo.api_key = $tag${}$tag$",
            "ALTER SYSTEM SET certyo.api_key = '{}' garbage",
            "ALTER SYSTEM SET certyo.api_key = '{}",
            "ALTER SYSTEM SET U&\"certyo\".U&\"api\\005fkey\" = '{}'",
            "ALTER DATABASE postgres SET certyo.api_key = '{}'",
            "ALTER ROLE postgres IN DATABASE postgres SET certyo.api_key TO '{}'",
            "SET certyo.api_key = '{}'",
            "SET SESSION \"certyo\".api_key TO '{}'",
            "SET \"certyo.api_key\" TO '{}'",
            "SELECT set_config('certyo.api_key', '{}', false)",
            "SELECT set_config('CERTYO.API_KEY', '{}', false)",
            "SELECT set_config(new_value => '{}', setting_name => 'certyo.api_key', is_local => false)",
            "SELECT set_config('certyo.' || 'api_key', '{}', false)",
            "SELECT set_config('certyo.a' || 'pi_key', '{}', false)",
            "SELECT set_config(E'certyo.\\x61pi_key', '{}', false)",
            "SELECT set_config('certyo.api_key', {}, false)",
            "SELECT 1; SET certyo.api_key = '{}'; SELECT 2",
            "DO $$BEGIN PERFORM set_config('certyo.api_key', '{}', false); END$$",
        ] {
            let statement = statement.replace("{}", SECRET);
            let out = statement_logged(&statement);
            assert!(!out.contains(SECRET), "{statement}\n  logged as {out}");
            assert!(!out.contains("0123456789"), "{statement}\n  logged as {out}");
        }
    }

    #[test]
    fn the_log_says_which_setting_was_set() {
        assert_eq!(
            statement_logged("ALTER SYSTEM SET CERTYO.API_KEY = 'new-key-987'"),
            "statement: ALTER SYSTEM SET CERTYO.API_KEY [redacted]"
        );
        assert_eq!(
            statement_logged("ALTER SYSTEM SET \"certyo\".\"api_key\" TO 'new-key-987'"),
            "statement: ALTER SYSTEM SET \"certyo\".\"api_key [redacted]"
        );
        assert_eq!(
            statement_logged("SELECT set_config('certyo.api_key', 'k-123456', false)"),
            "statement: SELECT set_config('certyo.api_key [redacted]"
        );
    }

    #[test]
    fn messages_about_a_statement_that_sets_the_key_lose_its_values() {
        let statement = format!("ALTER SYSTEM SET \"certyo\".api_key = '{SECRET}");
        for message in [
            format!("unterminated quoted string at or near \"'{SECRET}\""),
            format!("Zeichenkette in Anführungszeichen nicht beendet bei »'{SECRET}«"),
        ] {
            let out = logged(&message, &statement, "other");
            assert!(!out.contains(SECRET), "{out}");
        }
        let statement = format!("SELECT set_config('certyo.api_key', {SECRET}, false)");
        let out = logged(
            &format!("column \"{SECRET}\" does not exist"),
            &statement,
            "other",
        );
        assert!(!out.contains(SECRET), "{out}");
        // The parameters of a statement bound by the extended protocol.
        let statement = "SELECT set_config('certyo.api_key', $1, false)";
        let out = logged(&format!("Parameters: $1 = '{SECRET}'"), statement, "other");
        assert_eq!(out, "Parameters: $1 = '******************'");
    }

    #[test]
    fn other_settings_and_messages_stay_readable() {
        let message = r#"parameter "certyo.api_key_file" changed to "/etc/certyo/key""#;
        assert_eq!(assignment(message.as_bytes()), None);
        assert_eq!(logged(message, "", "unrelated-key"), message);
        let statement = "ALTER SYSTEM SET certyo.api_key_file = '/etc/certyo/key'";
        assert!(!suspect(statement.as_bytes()));
        assert_eq!(
            statement_logged(statement),
            format!("statement: {statement}")
        );
        let statement = "SELECT certyo.track('shop.orders')";
        assert_eq!(
            statement_logged(statement),
            format!("statement: {statement}")
        );
        let ours =
            "Certyo refused the API key: fix certyo.api_key_file (or certyo.api_key) and reload";
        assert_eq!(logged(ours, "", "unrelated-key"), ours);
    }

    #[test]
    fn the_key_itself_is_masked_wherever_it_appears() {
        assert_eq!(
            logged("abc KEY123 def KEY123", "", "KEY123"),
            "abc ****** def ******"
        );
        assert_eq!(logged("tiny", "", "KEY123"), "tiny");
    }
}
