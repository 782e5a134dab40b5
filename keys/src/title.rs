//! Title ids: the names that key files, archives and state files are made from.

use crate::KeyError;

/// Titles become file names, so they are restricted to a safe alphabet.
pub fn validate_title(title: &str) -> Result<(), KeyError> {
    let ok = !title.is_empty()
        && title.len() <= 128
        && !title.starts_with('.')
        && title
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadTitle(title.to_string()))
    }
}
