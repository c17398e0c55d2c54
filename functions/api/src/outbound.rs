//! Which destinations a function's `wasi:http` components may call: an allow-list in
//! the syntax of Spin's `allowed_outbound_hosts`. Deny by default: an empty list
//! allows nothing.
//!
//! An entry is `SCHEME://HOST[:PORT]` (a single trailing `/` is tolerated):
//! - SCHEME is `http`, `https` or `*` (either);
//! - HOST is a name (`api.example.com`), an IP literal (`10.0.0.7`, `[::1]`),
//!   `*.example.com` (any subdomain of `example.com`, not `example.com` itself) or `*`
//!   (any host);
//! - PORT is a number or `*` (any port); without one, only the default port of the
//!   request's scheme is allowed (80 for `http`, 443 for `https`; with scheme `*`,
//!   `http` on 80 and `https` on 443).
//!
//! Entries are parsed and checked once ([`OutboundAllowList::parse`], at deploy and
//! again when a host loads the function); each outgoing request is then matched on
//! its scheme and authority ([`OutboundAllowList::allows_uri`]) without allocating.
//! Host names match case-insensitively (and with or without one trailing dot); IP
//! literals match as addresses, never as names. A name is matched as written: what it
//! resolves to is not checked.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use http::Uri;

/// Most entries one function may list.
pub const MAX_ENTRIES: usize = 64;
/// Longest accepted entry, in bytes.
pub const MAX_ENTRY_LEN: usize = 300;

/// A function's parsed allow-list of outbound destinations. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct OutboundAllowList {
    rules: Option<Arc<[Rule]>>,
}

impl OutboundAllowList {
    /// Parses and checks every entry; the first bad one is refused with a sentence
    /// naming it and what is wrong with it.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<OutboundAllowList, crate::Error> {
        if entries.len() > MAX_ENTRIES {
            return Err(crate::Error::TooManyOutbound(entries.len()));
        }
        if entries.is_empty() {
            return Ok(OutboundAllowList::default());
        }
        let rules = entries
            .iter()
            .map(|e| {
                let e = e.as_ref();
                Rule::parse(e).map_err(|why| crate::Error::Outbound {
                    entry: e.to_string(),
                    why,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OutboundAllowList {
            rules: Some(rules.into()),
        })
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.rules().is_empty()
    }

    /// The entries as given.
    pub fn entries(&self) -> impl Iterator<Item = &str> {
        self.rules().iter().map(|r| r.text.as_str())
    }

    /// Whether a request to `scheme://host[:port]` is allowed. `host` is as in a URI's
    /// authority (IPv6 in brackets); `port: None` means the scheme's default.
    pub fn allows(&self, scheme: &str, host: &str, port: Option<u16>) -> bool {
        let Some(scheme) = Scheme::of_request(scheme) else {
            return false;
        };
        let port = port.unwrap_or(scheme.default_port());
        let host = RequestHost::of(host);
        self.rules()
            .iter()
            .any(|rule| rule.matches(scheme, &host, port))
    }

    /// Whether an outgoing request to `uri` (absolute: scheme and authority) is
    /// allowed. Authorities with user info, or a port that is not a number, are not.
    pub fn allows_uri(&self, uri: &Uri) -> bool {
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return false;
        };
        let host = authority.host();
        let port = match authority.port() {
            Some(port) => Some(port.as_u16()),
            // No port: then the authority is the host alone (no user info, no
            // empty or unparsable port that the sender would handle its own way).
            None if authority.as_str().len() == host.len() => None,
            None => return false,
        };
        if authority.as_str().contains('@') {
            return false;
        }
        self.allows(scheme, host, port)
    }

    fn rules(&self) -> &[Rule] {
        self.rules.as_deref().unwrap_or(&[])
    }
}

impl fmt::Debug for OutboundAllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries()).finish()
    }
}

/// One parsed entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    text: String,
    scheme: SchemeRule,
    host: HostRule,
    port: PortRule,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn of_request(s: &str) -> Option<Scheme> {
        if s.eq_ignore_ascii_case("http") {
            Some(Scheme::Http)
        } else if s.eq_ignore_ascii_case("https") {
            Some(Scheme::Https)
        } else {
            None
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SchemeRule {
    Only(Scheme),
    Any,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostRule {
    Any,
    /// A lower-case name without a trailing dot.
    Name(String),
    /// Subdomains of a lower-case name: `.example.com` for `*.example.com`.
    Subdomains(String),
    Ip(IpAddr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortRule {
    /// The default port of the request's scheme.
    Default,
    Any,
    Exact(u16),
}

/// The host of a request, seen once: an IP address or a name (trailing dot dropped).
enum RequestHost<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

impl<'a> RequestHost<'a> {
    fn of(host: &'a str) -> RequestHost<'a> {
        if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            return match inner.parse::<Ipv6Addr>() {
                Ok(ip) => RequestHost::Ip(IpAddr::V6(ip)),
                // Not an address: matches no rule but `*`.
                Err(_) => RequestHost::Name(host),
            };
        }
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return RequestHost::Ip(IpAddr::V4(ip));
        }
        RequestHost::Name(host.strip_suffix('.').unwrap_or(host))
    }
}

impl Rule {
    fn matches(&self, scheme: Scheme, host: &RequestHost<'_>, port: u16) -> bool {
        let scheme_ok = match self.scheme {
            SchemeRule::Any => true,
            SchemeRule::Only(s) => s == scheme,
        };
        let port_ok = match self.port {
            PortRule::Any => true,
            PortRule::Exact(p) => p == port,
            PortRule::Default => port == scheme.default_port(),
        };
        let host_ok = match (&self.host, host) {
            (HostRule::Any, _) => true,
            (HostRule::Ip(rule), RequestHost::Ip(ip)) => rule == ip,
            (HostRule::Name(rule), RequestHost::Name(name)) => rule.eq_ignore_ascii_case(name),
            (HostRule::Subdomains(suffix), RequestHost::Name(name)) => {
                let (name, suffix) = (name.as_bytes(), suffix.as_bytes());
                // At least one character before the dot: a subdomain, not the name.
                name.len() > suffix.len() && {
                    let cut = name.len() - suffix.len();
                    name.get(cut..)
                        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
                        && name.get(cut - 1) != Some(&b'.')
                }
            }
            _ => false,
        };
        scheme_ok && port_ok && host_ok
    }

    fn parse(text: &str) -> Result<Rule, String> {
        if text.is_empty() {
            return Err("is empty".into());
        }
        if text.len() > MAX_ENTRY_LEN {
            return Err(format!("is longer than {MAX_ENTRY_LEN} bytes"));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("contains white space or control characters".into());
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(
                "has no scheme; write http://HOST, https://HOST or *://HOST (with an optional \
                 :PORT)"
                    .into(),
            );
        };
        let scheme = if scheme.eq_ignore_ascii_case("http") {
            SchemeRule::Only(Scheme::Http)
        } else if scheme.eq_ignore_ascii_case("https") {
            SchemeRule::Only(Scheme::Https)
        } else if scheme == "*" {
            SchemeRule::Any
        } else {
            return Err(format!(
                "scheme {scheme:?} is not supported; use http, https or *"
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(
                "must not have a path, query or fragment (only SCHEME://HOST[:PORT])".into(),
            );
        }
        if rest.contains('@') {
            return Err("must not have user info (only SCHEME://HOST[:PORT])".into());
        }
        let (host, port) = split_host_port(rest)?;
        let host = parse_host(host)?;
        let port = match port {
            None => PortRule::Default,
            Some("*") => PortRule::Any,
            Some(p) => match p.parse::<u16>() {
                Ok(0) => return Err("port 0 is not a port one can call".into()),
                Ok(n) if p.bytes().all(|b| b.is_ascii_digit()) => PortRule::Exact(n),
                _ => return Err(format!("port {p:?} is not a number from 1 to 65535, or *")),
            },
        };
        Ok(Rule {
            text: text.to_string(),
            scheme,
            host,
            port,
        })
    }
}

/// `host[:port]` or `[v6][:port]`, split.
fn split_host_port(s: &str) -> Result<(&str, Option<&str>), String> {
    if s.starts_with('[') {
        let Some(end) = s.find(']') else {
            return Err("has a '[' without its ']'".into());
        };
        let (host, after) = s.split_at(end + 1);
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(format!("unexpected {after:?} after the address")),
            },
        };
    }
    match s.split_once(':') {
        None => Ok((s, None)),
        Some((host, port)) if !port.contains(':') => Ok((host, Some(port))),
        Some(_) => {
            Err("has too many ':'; write IPv6 addresses in brackets, e.g. http://[::1]:8080".into())
        }
    }
}

fn parse_host(host: &str) -> Result<HostRule, String> {
    if host.is_empty() {
        return Err("has no host".into());
    }
    if host == "*" {
        return Ok(HostRule::Any);
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').unwrap_or(inner);
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| HostRule::Ip(IpAddr::V6(ip)))
            .map_err(|_| format!("{inner:?} is not an IPv6 address"));
    }
    if let Some(suffix) = host.strip_prefix("*.") {
        if suffix.contains('*') {
            return Err(wildcard_message());
        }
        let name = check_name(suffix)?;
        return Ok(HostRule::Subdomains(format!(".{name}")));
    }
    if host.contains('*') {
        return Err(wildcard_message());
    }
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    // A last label of digits only is no host name: it must be an IPv4 address.
    if trimmed
        .rsplit('.')
        .next()
        .is_some_and(|last| !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
    {
        return host
            .parse::<Ipv4Addr>()
            .map(|ip| HostRule::Ip(IpAddr::V4(ip)))
            .map_err(|_| {
                format!("{host:?} is not an IPv4 address (four numbers 0-255 with dots)")
            });
    }
    Ok(HostRule::Name(check_name(host)?))
}

fn wildcard_message() -> String {
    "a wildcard is allowed only as the whole host (*) or as its first label \
     (*.example.com)"
        .into()
}

/// A DNS name: labels of letters, digits, '-' and '_' (1 to 63 each, not starting or
/// ending with '-'), 253 characters at most; one trailing dot allowed. Lower-cased,
/// without the dot.
fn check_name(name: &str) -> Result<String, String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("host name {name:?} must be 1 to 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "host name {name:?} has an empty label or one longer than 63 characters"
            ));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(format!(
                "host name {name:?} contains {bad:?}; use letters, digits, '-' and '_'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "host name {name:?} has a label starting or ending with '-'"
            ));
        }
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> OutboundAllowList {
        OutboundAllowList::parse(entries).unwrap()
    }

    fn allows(l: &OutboundAllowList, url: &str) -> bool {
        l.allows_uri(&url.parse::<Uri>().unwrap())
    }

    #[test]
    fn empty_allows_nothing() {
        let l = OutboundAllowList::default();
        assert!(l.is_empty());
        assert!(!allows(&l, "http://example.com/"));
        let l = OutboundAllowList::parse::<&str>(&[]).unwrap();
        assert!(l.is_empty());
        assert!(!allows(&l, "https://example.com/"));
    }

    #[test]
    fn schemes_and_default_ports() {
        let l = list(&["http://example.com"]);
        assert!(allows(&l, "http://example.com/x?y=1"));
        assert!(allows(&l, "http://example.com:80/"));
        assert!(!allows(&l, "http://example.com:8080/"));
        assert!(!allows(&l, "https://example.com/"));

        let l = list(&["https://example.com"]);
        assert!(allows(&l, "https://example.com/"));
        assert!(allows(&l, "https://example.com:443/"));
        assert!(!allows(&l, "https://example.com:80/"));
        assert!(!allows(&l, "http://example.com/"));
        assert!(!allows(&l, "http://example.com:443/"));

        let l = list(&["*://example.com"]);
        assert!(allows(&l, "http://example.com/"));
        assert!(allows(&l, "https://example.com/"));
        assert!(!allows(&l, "http://example.com:443/"));
        assert!(!allows(&l, "https://example.com:80/"));

        let l = list(&["HTTPS://example.com/"]);
        assert!(allows(&l, "https://example.com/"));
        assert!(!l.allows("ftp", "example.com", None));
    }

    #[test]
    fn ports() {
        let l = list(&["http://example.com:8080"]);
        assert!(allows(&l, "http://example.com:8080/"));
        assert!(!allows(&l, "http://example.com/"));
        assert!(!allows(&l, "http://example.com:8081/"));
        let l = list(&["*://example.com:*"]);
        assert!(allows(&l, "http://example.com:1/"));
        assert!(allows(&l, "https://example.com:65535/"));
        assert!(allows(&l, "https://example.com/"));
        assert!(!allows(&l, "https://example.org/"));
    }

    #[test]
    fn wildcards() {
        let l = list(&["https://*.example.com"]);
        assert!(allows(&l, "https://api.example.com/"));
        assert!(allows(&l, "https://a.b.example.com/"));
        assert!(allows(&l, "https://API.Example.COM/"));
        assert!(!allows(&l, "https://example.com/"));
        assert!(!allows(&l, "https://badexample.com/"));
        assert!(!allows(&l, "https://.example.com/"));
        assert!(!allows(&l, "https://example.com.evil.org/"));
        assert!(!allows(&l, "https://[::1]/"));

        let l = list(&["*://*:*"]);
        assert!(allows(&l, "http://anything:1234/"));
        assert!(allows(&l, "https://10.0.0.1/"));
        assert!(allows(&l, "http://[::1]:8080/"));
        let l = list(&["http://*"]);
        assert!(allows(&l, "http://anything/"));
        assert!(!allows(&l, "http://anything:8080/"));
        assert!(!allows(&l, "https://anything/"));
    }

    #[test]
    fn ip_literals_match_as_addresses() {
        let l = list(&["http://127.0.0.1:8080", "http://[::1]:8080"]);
        assert!(allows(&l, "http://127.0.0.1:8080/"));
        assert!(allows(&l, "http://[::1]:8080/"));
        assert!(allows(&l, "http://[0:0:0:0:0:0:0:1]:8080/"));
        assert!(!allows(&l, "http://127.0.0.2:8080/"));
        assert!(!allows(&l, "http://127.0.0.1:8081/"));
        assert!(!allows(&l, "http://localhost:8080/"));
        // Other spellings of the address are not it.
        assert!(!allows(&l, "http://127.1:8080/"));
        assert!(!allows(&l, "http://[::ffff:127.0.0.1]:8080/"));
        // A name rule never matches an address.
        let l = list(&["http://localhost:8080"]);
        assert!(allows(&l, "http://LOCALHOST:8080/"));
        assert!(!allows(&l, "http://127.0.0.1:8080/"));
    }

    #[test]
    fn names_match_case_insensitively_with_one_trailing_dot() {
        let l = list(&["https://API.Example.com."]);
        assert!(allows(&l, "https://api.example.com/"));
        assert!(allows(&l, "https://api.example.com./"));
        assert!(!allows(&l, "https://api.example.com../"));
        assert!(!allows(&l, "https://xapi.example.com/"));
        assert_eq!(
            l.entries().collect::<Vec<_>>(),
            ["https://API.Example.com."]
        );
        assert_eq!(format!("{l:?}"), "[\"https://API.Example.com.\"]");
    }

    #[test]
    fn odd_authorities_are_refused() {
        let l = list(&["*://*:*"]);
        assert!(!allows(&l, "http://user@example.com/"));
        assert!(!allows(&l, "http://example.com:/"));
        assert!(!allows(&l, "/relative"));
        assert!(!l.allows("gopher", "example.com", None));
        let l = list(&["http://example.com"]);
        assert!(!allows(&l, "http://example.com@evil.org/"));
        assert!(!allows(&l, "http://evil.org@example.com/"));
    }

    #[test]
    fn bad_entries_are_refused_with_reasons() {
        let err = |e: &str| OutboundAllowList::parse(&[e]).unwrap_err().to_string();
        for (entry, why) in [
            ("", "is empty"),
            ("example.com", "has no scheme"),
            ("ftp://example.com", "scheme \"ftp\" is not supported"),
            ("tcp://example.com:80", "not supported"),
            ("http://", "has no host"),
            ("http://:80", "has no host"),
            ("http://example.com/path", "must not have a path"),
            ("http://example.com?x", "must not have a path"),
            ("http://10.0.0.0/8", "must not have a path"),
            ("http://u@example.com", "user info"),
            ("http://example.com:0", "port 0"),
            ("http://example.com:70000", "not a number from 1 to 65535"),
            ("http://example.com:+80", "not a number"),
            ("http://example.com:", "not a number"),
            ("http://example.com:80..90", "not a number"),
            ("http://::1", "brackets"),
            ("http://[::1", "without its ']'"),
            ("http://[nope]", "not an IPv6 address"),
            ("http://[::1]x", "after the address"),
            ("http://999.0.0.1", "not an IPv4 address"),
            ("http://127.1", "not an IPv4 address"),
            ("http://a.*.com", "wildcard"),
            ("http://*example.com", "wildcard"),
            ("http://*.*.com", "wildcard"),
            ("http://*.", "1 to 253"),
            ("http://exa mple.com", "white space"),
            ("http://exa%6dple.com", "contains '%'"),
            ("http://-a.com", "starting or ending with '-'"),
            ("http://a..com", "empty label"),
        ] {
            let message = err(entry);
            assert!(
                message.contains(why) && message.contains(&format!("{entry:?}")),
                "{entry:?}: {message}"
            );
        }
        assert!(err(&format!("http://{}.com", "a".repeat(64))).contains("63"));
        assert!(err(&format!("http://{}", "a".repeat(MAX_ENTRY_LEN))).contains("longer"));
        let many = vec!["http://a.com"; MAX_ENTRIES + 1];
        assert!(OutboundAllowList::parse(&many)
            .unwrap_err()
            .to_string()
            .contains("more than"));
        // The first bad entry is named.
        let message = OutboundAllowList::parse(&["http://ok.com", "bad"])
            .unwrap_err()
            .to_string();
        assert!(message.contains("\"bad\""), "{message}");
    }

    #[test]
    fn good_entries_parse() {
        for entry in [
            "http://a",
            "https://a-b.c_d.example:8443",
            "*://*",
            "http://*:*",
            "https://*.example.com:*",
            "http://192.168.0.1",
            "https://[2001:db8::1]:443",
            "http://xn--bcher-kva.example/",
        ] {
            assert!(OutboundAllowList::parse(&[entry]).is_ok(), "{entry}");
        }
    }
}
