//! `--env-file`: dotenv-style `KEY=VALUE` lines for a task's environment.
//!
//! Blank lines and `#` comments are skipped; `export KEY=VALUE` is accepted; a value may be
//! bare (trimmed, a ` #` starts a comment), in single quotes (taken as it is) or in double
//! quotes (`\n`, `\t`, `\"`, `\\` and `\$` escapes). Values are secrets as far as Skyward is
//! concerned: errors name the file and line, never the value.

use std::path::Path;

/// Reads `path`; an error names `path:line` and what to fix.
pub fn read(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--env-file {}: {e}", path.display()))?;
    parse(&text).map_err(|(line, why)| format!("{}:{line}: {why}", path.display()))
}

/// Parses a whole file; an error is its 1-based line number and what is wrong.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut vars = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line
            .strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err((
                index + 1,
                "not KEY=VALUE: write e.g. API_URL=https://example.com".into(),
            ));
        };
        let key = key.trim_end();
        if !is_name(key) {
            return Err((
                index + 1,
                "the name must be letters, digits and _ (not starting with a digit)".into(),
            ));
        }
        let value = value.trim_start();
        let value = unquote(value).map_err(|why| (index + 1, why))?;
        vars.push((key.to_string(), value));
    }
    Ok(vars)
}

fn is_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn unquote(value: &str) -> Result<String, String> {
    let after = |rest: &str| {
        let rest = rest.trim();
        if rest.is_empty() || rest.starts_with('#') {
            Ok(())
        } else {
            Err("text after the closing quote: put it inside the quotes".to_string())
        }
    };
    if let Some(inner) = value.strip_prefix('\'') {
        let end = inner
            .find('\'')
            .ok_or("unclosed single quote: end the value with '")?;
        after(&inner[end + 1..])?;
        return Ok(inner[..end].to_string());
    }
    if let Some(inner) = value.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = inner.char_indices();
        while let Some((at, c)) = chars.next() {
            match c {
                '"' => {
                    after(&inner[at + 1..])?;
                    return Ok(out);
                }
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('r') => out.push('\r'),
                    Some(c @ ('"' | '\\' | '$' | '\'')) => out.push(c),
                    _ => return Err("unknown escape: use \\n, \\t, \\\", \\\\ or \\$".into()),
                },
                c => out.push(c),
            }
        }
        return Err("unclosed double quote: end the value with \"".into());
    }
    // A bare value ends at a comment.
    let bare = match value.find(" #") {
        Some(at) => &value[..at],
        None => value,
    };
    Ok(bare.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_lines_parse() {
        let text = "# a comment\n\nA=1\nexport B = two words # note\nC='single # kept \\n'\nD=\"line\\nnext \\\"q\\\"\"\nE=\nF=x=y\n";
        let vars = parse(text).unwrap();
        let expect = [
            ("A", "1"),
            ("B", "two words"),
            ("C", "single # kept \\n"),
            ("D", "line\nnext \"q\""),
            ("E", ""),
            ("F", "x=y"),
        ];
        assert_eq!(vars.len(), expect.len());
        for ((k, v), (ek, ev)) in vars.iter().zip(expect) {
            assert_eq!((k.as_str(), v.as_str()), (ek, ev));
        }
    }

    #[test]
    fn bad_lines_name_their_number_and_never_the_value() {
        for (text, line) in [
            ("A=1\nno equals sign here\n", 2),
            ("1A=x\n", 1),
            ("A=1\n\nB='unclosed secret\n", 3),
            ("A=\"unclosed secret\n", 1),
            ("A=\"bad \\q escape\"\n", 1),
            ("A='x' trailing\n", 1),
            ("BAD KEY=v\n", 1),
        ] {
            let (at, why) = parse(text).unwrap_err();
            assert_eq!(at, line, "{text:?}: {why}");
            assert!(!why.contains("secret"), "{why}");
        }
    }
}
