//! Offer constraints: which agents a framework (in one of its roles) may be offered,
//! by the agent's attributes and hostname. An edge framework pins its work with
//! `zone=edge-1`; one that needs a GPU host says `gpu`; `hostname~edge-*` takes any
//! edge host.
//!
//! Patterns are small globs (`*` any run of characters, `?` one character, `\`
//! escapes the next one) rather than regular expressions: enough for host and zone
//! names, linear in practice, and no dependency.

use std::collections::BTreeMap;
use std::fmt;

/// What a constraint looks at.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConstraintField {
    /// The agent's hostname (the field is spelled `hostname`).
    Hostname,
    /// An agent attribute, by name.
    Attribute(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConstraintOp {
    /// The attribute is present (always true of the hostname).
    Exists,
    /// The value is exactly this.
    Equals(String),
    /// The value matches this glob.
    Matches(String),
    /// The attribute is absent (never true of the hostname).
    Absent,
    /// The value is not this (an agent without the attribute meets it).
    NotEquals(String),
    /// The value does not match this glob (an agent without the attribute meets it).
    NotMatches(String),
}

/// One condition an agent must meet to be offered to a framework; a framework's
/// constraints in a role must all hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Constraint {
    pub field: ConstraintField,
    pub op: ConstraintOp,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("constraint `{text}`: {why}; write `name` (exists), `!name` (absent), `name=value`, `name==value` or `name:value` (equals), `name!=value` (differs), `name~glob` (matches; `*` and `?` are wildcards) or `name!~glob`; a name is letters, digits, `.`, `_`, `-` and `/`, and `hostname` means the agent's hostname")]
pub struct ConstraintParseError {
    pub text: String,
    pub why: String,
}

fn field(name: &str) -> ConstraintField {
    if name == "hostname" {
        ConstraintField::Hostname
    } else {
        ConstraintField::Attribute(name.to_string())
    }
}

impl Constraint {
    pub fn exists(attribute: &str) -> Self {
        Constraint {
            field: field(attribute),
            op: ConstraintOp::Exists,
        }
    }

    /// `field` is an attribute name, or `hostname`.
    pub fn equals(field_name: &str, value: &str) -> Self {
        Constraint {
            field: field(field_name),
            op: ConstraintOp::Equals(value.to_string()),
        }
    }

    /// `field` is an attribute name, or `hostname`; `pattern` is a glob.
    pub fn matches(field_name: &str, pattern: &str) -> Self {
        Constraint {
            field: field(field_name),
            op: ConstraintOp::Matches(pattern.to_string()),
        }
    }

    /// Parses `zone` (exists), `!zone` (absent), `zone=edge-1`, `zone==edge-1` or
    /// `zone:edge-1` (equals), `zone!=b` (differs), `zone~edge-*` (matches) and
    /// `zone!~edge-*` (does not match). Anything else is refused, never read as an
    /// odd attribute name (`zone!` or `zone=` would wait for ever).
    pub fn parse(text: &str) -> Result<Self, ConstraintParseError> {
        let err = |why: String| ConstraintParseError {
            text: text.to_string(),
            why,
        };
        let t = text.trim();
        let (negated_name, t) = match t.strip_prefix('!') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, t),
        };
        let split = t.find(['=', ':', '~', '!']);
        let (name, op) = match split {
            None => (t, None),
            Some(i) => {
                let rest = &t[i..];
                let (op, len) = if rest.starts_with("!=") {
                    ("!=", 2)
                } else if rest.starts_with("!~") {
                    ("!~", 2)
                } else if rest.starts_with("==") {
                    ("=", 2)
                } else if rest.starts_with('!') {
                    return Err(err(
                        "`!` goes before a name (`!gpu`) or makes `!=` or `!~`".into()
                    ));
                } else {
                    (&rest[..1], 1)
                };
                (t[..i].trim_end(), Some((op, rest[len..].trim_start())))
            }
        };
        if name.is_empty() {
            return Err(err("the attribute name is missing".into()));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
        {
            return Err(err(format!("`{c}` cannot be part of an attribute name")));
        }
        let op = match (negated_name, op) {
            (false, None) => ConstraintOp::Exists,
            (true, None) => {
                if name == "hostname" {
                    return Err(err(
                        "every agent has a hostname; `!hostname` meets none".into()
                    ));
                }
                ConstraintOp::Absent
            }
            (true, Some(_)) => {
                return Err(err("write `name!=value` rather than `!name=value`".into()));
            }
            (false, Some((op, value))) => {
                if value.is_empty() {
                    return Err(err(format!("the value after `{op}` is missing")));
                }
                if value.chars().any(char::is_control) {
                    return Err(err("a value has no control characters".into()));
                }
                let value = value.to_string();
                match op {
                    "=" | ":" => ConstraintOp::Equals(value),
                    "~" => ConstraintOp::Matches(value),
                    "!=" => ConstraintOp::NotEquals(value),
                    _ => ConstraintOp::NotMatches(value),
                }
            }
        };
        Ok(Constraint {
            field: field(name),
            op,
        })
    }

    pub fn is_met(&self, hostname: &str, attributes: &BTreeMap<String, String>) -> bool {
        let value = match &self.field {
            ConstraintField::Hostname => Some(hostname),
            ConstraintField::Attribute(name) => attributes.get(name).map(String::as_str),
        };
        match (&self.op, value) {
            (
                ConstraintOp::Absent | ConstraintOp::NotEquals(_) | ConstraintOp::NotMatches(_),
                None,
            ) => true,
            (_, None) => false,
            (ConstraintOp::Absent, Some(_)) => false,
            (ConstraintOp::NotEquals(v), Some(have)) => have != v,
            (ConstraintOp::NotMatches(pattern), Some(v)) => !glob_match(pattern, v),
            (ConstraintOp::Exists, Some(_)) => true,
            (ConstraintOp::Equals(want), Some(v)) => v == want,
            (ConstraintOp::Matches(pattern), Some(v)) => glob_match(pattern, v),
        }
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.op == ConstraintOp::Absent {
            f.write_str("!")?;
        }
        match &self.field {
            ConstraintField::Hostname => f.write_str("hostname")?,
            ConstraintField::Attribute(n) => f.write_str(n)?,
        }
        match &self.op {
            ConstraintOp::Exists | ConstraintOp::Absent => Ok(()),
            ConstraintOp::NotEquals(v) => write!(f, "!={v}"),
            ConstraintOp::NotMatches(p) => write!(f, "!~{p}"),
            // `a==b` would read back as `a` equals `b`: a value that starts with
            // `=` is written after `:`.
            ConstraintOp::Equals(v) if v.starts_with('=') => write!(f, ":{v}"),
            ConstraintOp::Equals(v) => write!(f, "={v}"),
            ConstraintOp::Matches(p) => write!(f, "~{p}"),
        }
    }
}

impl std::str::FromStr for Constraint {
    type Err = ConstraintParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Constraint::parse(s)
    }
}

/// Glob matching: `*` matches any run of characters (also none), `?` exactly one,
/// `\x` the character `x`. Greedy with one backtrack point, so O(len(pattern) ·
/// len(text)) at worst and linear for the patterns people write.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    #[derive(Clone, Copy)]
    enum Tok {
        Any,
        One,
        Lit(char),
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '*' => Tok::Any,
            '?' => Tok::One,
            '\\' => Tok::Lit(chars.next().unwrap_or('\\')),
            c => Tok::Lit(c),
        });
    }
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, text index).
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match toks.get(p) {
            Some(Tok::Any) => {
                star = Some((p + 1, t));
                p += 1;
            }
            Some(Tok::One) => {
                p += 1;
                t += 1;
            }
            Some(Tok::Lit(c)) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and retry.
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    p = sp;
                    t = st + 1;
                }
                None => return false,
            },
        }
    }
    toks[p..].iter().all(|t| matches!(t, Tok::Any))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("edge-*", "edge-1", true),
            ("edge-*", "edge-", true),
            ("edge-*", "core-1", false),
            ("*-1", "edge-1", true),
            ("e?ge", "edge", true),
            ("e?ge", "eddge", false),
            ("*", "", true),
            ("", "", true),
            ("", "x", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            (r"a\*", "a*", true),
            (r"a\*", "ab", false),
            ("**x", "abx", true),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} vs {t}");
        }
    }

    #[test]
    fn parse_and_match() {
        let attrs: BTreeMap<String, String> = [("zone".to_string(), "edge-1".to_string())].into();
        let c = Constraint::parse("zone=edge-1").unwrap();
        assert_eq!(c, Constraint::equals("zone", "edge-1"));
        assert_eq!(Constraint::parse("zone:edge-1").unwrap(), c);
        assert!(c.is_met("h", &attrs));
        assert!(Constraint::parse("zone").unwrap().is_met("h", &attrs));
        assert!(!Constraint::parse("gpu").unwrap().is_met("h", &attrs));
        let h = Constraint::parse("hostname~edge-*").unwrap();
        assert_eq!(h.field, ConstraintField::Hostname);
        assert!(h.is_met("edge-7", &attrs) && !h.is_met("core-7", &attrs));
        assert_eq!(h.to_string(), "hostname~edge-*");
        assert!(Constraint::parse("=x").is_err());
        assert!(Constraint::parse("a b=c").is_err());
    }

    #[test]
    fn negations_and_double_equals_parse_and_the_rest_is_refused() {
        let a: BTreeMap<String, String> = [("zone".to_string(), "b".to_string())].into();
        let none = BTreeMap::new();
        let eq = Constraint::parse("zone==b").unwrap();
        assert_eq!(eq, Constraint::equals("zone", "b"));
        let ne = Constraint::parse("zone!=b").unwrap();
        assert!(!ne.is_met("h", &a) && ne.is_met("h", &none));
        assert!(Constraint::parse("zone != c").unwrap().is_met("h", &a));
        let nm = Constraint::parse("zone!~b*").unwrap();
        assert!(!nm.is_met("h", &a) && nm.is_met("h", &none));
        let absent = Constraint::parse("!gpu").unwrap();
        assert!(absent.is_met("h", &a));
        assert!(!Constraint::parse("!zone").unwrap().is_met("h", &a));
        // Found by the parsers fuzz target: `ct:=` printed as `ct==`, which read
        // back as an empty value.
        let odd = Constraint::parse("ct:=").unwrap();
        assert_eq!(odd, Constraint::equals("ct", "="));
        for c in [&ne, &nm, &absent, &eq, &odd] {
            assert_eq!(&Constraint::parse(&c.to_string()).unwrap(), c, "{c}");
        }
        for (bad, says) in [
            ("zone!b", "`!` goes before"),
            ("zone=", "value after `=` is missing"),
            ("zone!=", "value after `!=` is missing"),
            ("zone=>b", ""),
            ("zo*ne=b", "`*` cannot be part"),
            ("!zone=b", "rather than"),
            ("!hostname", "every agent has a hostname"),
            ("zone=\u{7}", "control"),
        ] {
            let e = Constraint::parse(bad).map(|c| c.to_string());
            if bad == "zone=>b" {
                // `>b` is a value: an attribute can be spelled that way.
                assert_eq!(e.as_deref(), Ok("zone=>b"));
                continue;
            }
            let e = e.expect_err(bad).to_string();
            assert!(e.contains(says) && e.contains("name!=value"), "{bad}: {e}");
        }
    }
}
