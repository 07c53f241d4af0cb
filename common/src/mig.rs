//! The MIG layout a pool asks for (`--mig`): parsed by the coordinator's CLI, so that a typo
//! is refused before anything is provisioned, and by the agent, which applies it.

use std::time::Duration;

/// How long an agent may take to apply the layout to all its GPUs together (the coordinator
/// waits that much longer for such nodes to connect).
pub const MIG_BUDGET: Duration = Duration::from_secs(180);

/// What `--mig` asks of every GPU of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// As many instances of this profile as the GPU holds.
    Fill(String),
    /// Exactly these profiles (order does not matter).
    Exact(Vec<String>),
}

impl Layout {
    /// `1g.10gb` (fill) or `3g.40gb,2g.20gb,1g.10gb` (exactly these); case and spaces around
    /// commas do not matter.
    pub fn parse(text: &str) -> Result<Layout, String> {
        let profiles: Vec<String> = text
            .split(',')
            .map(|p| p.trim().to_ascii_lowercase())
            .collect();
        if let Some(bad) = profiles.iter().find(|p| !is_profile_name(p)) {
            return Err(format!(
                "invalid MIG layout {text:?}: {bad:?} is not a profile <slices>g.<memory>gb; give one profile to fill each GPU (--mig 1g.10gb) or a list (--mig 3g.40gb,2g.20gb,1g.10gb)"
            ));
        }
        Ok(match <[String; 1]>::try_from(profiles) {
            Ok([one]) => Layout::Fill(one),
            Err(many) => Layout::Exact(many),
        })
    }
}

/// `<n>g.<m>gb`, optionally with the suffixes newer GPUs add (`1g.10gb+me`, `1g.24gb-me`).
fn is_profile_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (base, suffix) = match name.find(['+', '-']) {
        Some(at) => name.split_at(at),
        None => (name, ""),
    };
    let Some((slices, memory)) = base.split_once("g.") else {
        return false;
    };
    let suffix_ok = suffix
        .split(['+', '-'])
        .skip(1)
        .all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'.'));
    digits(slices) && slices != "0" && memory.strip_suffix("gb").is_some_and(digits) && suffix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_is_one_profile_to_fill_with_or_a_list() {
        assert_eq!(Layout::parse("1g.10gb"), Ok(Layout::Fill("1g.10gb".into())));
        assert_eq!(
            Layout::parse(" 3G.40GB, 2g.20gb ,1g.10gb"),
            Ok(Layout::Exact(vec![
                "3g.40gb".into(),
                "2g.20gb".into(),
                "1g.10gb".into()
            ]))
        );
        assert_eq!(
            Layout::parse("1g.10gb+me,1g.24gb-me"),
            Ok(Layout::Exact(vec![
                "1g.10gb+me".into(),
                "1g.24gb-me".into()
            ]))
        );
        for bad in [
            "",
            "3g40gb",
            "1g.10",
            "g.10gb",
            "0g.10gb",
            "1g.gb",
            "1g.10gb,,2g.20gb",
            "1g.10gb+",
            "7g.80gb;1g.10gb",
            "MIG 1g.10gb",
        ] {
            let e = Layout::parse(bad).unwrap_err();
            assert!(
                e.contains("<slices>g.<memory>gb") && e.contains("--mig 1g.10gb"),
                "{bad:?}: {e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
