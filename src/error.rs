//! Errors and exit statuses.
//!
//! Two kinds of failure reach the user: bad input (a file, a line, a tensor, an argument that is not what
//! the command expects; exit status 2) and runtime failures (I/O, the device; exit status 1). Bad input is
//! an [`InputError`] anywhere in an `anyhow` chain, so context added on the way up keeps the status.

use std::fmt;

/// Input that the user controls is not what was expected. The message is one sentence naming the file,
/// line, id or tensor.
#[derive(Debug)]
pub struct InputError(pub String);

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// Wraps a message as bad input (exit status 2).
pub fn input(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(InputError(msg.into()))
}

/// Bad input naming the first of `flags` (name, value) that is 0, which a count must not be.
pub fn at_least_one(flags: &[(&str, usize)]) -> anyhow::Result<()> {
    match flags.iter().find(|(_, value)| *value == 0) {
        Some((flag, _)) => Err(input(format!("{flag} must be at least 1"))),
        None => Ok(()),
    }
}

/// Returns early with bad input, formatted like `format!`.
#[macro_export]
macro_rules! bail_input {
    ($($arg:tt)*) => {
        return Err($crate::error::input(format!($($arg)*)))
    };
}

/// True when the error (or any cause in its chain) is bad input.
pub fn is_input_error(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| cause.is::<InputError>())
}

/// The process exit status for an error: 2 for bad input, 1 for everything else.
pub fn exit_status(err: &anyhow::Error) -> i32 {
    if is_input_error(err) { 2 } else { 1 }
}

/// Formats an error chain as one line: outermost context first, causes after colons.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn input_errors_keep_status_2_through_context() {
        let err: anyhow::Result<()> = Err(input("items.jsonl line 3: no \"id\" field"));
        let err = err.context("embedding failed").unwrap_err();
        assert_eq!(exit_status(&err), 2);
        assert_eq!(one_line(&err), "embedding failed: items.jsonl line 3: no \"id\" field");
    }

    #[test]
    fn a_zero_count_is_named_first_in_the_order_given() {
        assert!(at_least_one(&[("--a", 1), ("--b", 3)]).is_ok());
        let err = at_least_one(&[("--a", 2), ("--b", 0), ("--c", 0)]).unwrap_err();
        assert_eq!((exit_status(&err), one_line(&err)), (2, "--b must be at least 1".to_string()));
    }

    #[test]
    fn other_errors_are_status_1() {
        let err = anyhow::anyhow!("device lost");
        assert_eq!(exit_status(&err), 1);
    }
}
