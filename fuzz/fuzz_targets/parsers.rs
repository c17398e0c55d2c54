//! The text parsers of things people and peers write: resources (`cpus:2;mem:1GiB`,
//! static reservations), sizes and durations, offer constraints, and the functions'
//! outbound allow-lists. The first byte picks the parser, the rest is its text.
//! Where a formatter exists, what parses must format and parse back to itself.
#![no_main]
use agora_allocator::{glob_match, Constraint};
use agora_fn_api::outbound::OutboundAllowList;
use agora_proto::resources::{format_cpus, parse_cpus, CPUS, MEM};
use agora_proto::units::{
    format_bytes, format_duration, parse_duration, parse_duration_ms, parse_size,
};
use agora_proto::Resources;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which % 6 {
        0 => resources(&text),
        1 => size(&text),
        2 => duration(&text),
        3 => constraint(&text),
        4 => allow_list(&text),
        _ => cpus(&text),
    }
});

/// `Resources::parse`: what parses formats (Display) and parses back to the same
/// amounts, except memory, which Display may round down to a tenth of its unit;
/// and it survives `to_proto`/`from_proto` unchanged.
fn resources(text: &str) {
    let Ok(r) = Resources::parse(text) else {
        return;
    };
    let back = Resources::from_proto(&r.to_proto()).expect("our own proto form parses");
    assert_eq!(back, r, "to_proto/from_proto changed {text:?}");
    if r.is_empty() {
        assert_eq!(r.to_string(), "(none)");
        return;
    }
    let shown = r.to_string();
    // Names or roles holding the syntax's own characters cannot be written back.
    if r.roles()
        .iter()
        .chain(r.names().iter())
        .any(|s| s.contains([';', ':', '(', ')']) || s != s.trim())
    {
        return;
    }
    let again = Resources::parse(&shown)
        .unwrap_or_else(|e| panic!("{shown:?} (from {text:?}) does not parse: {e}"));
    for role in r.roles().iter().map(String::as_str).chain([""]) {
        let (a, b) = (r.of_role(role), again.of_role(role));
        for name in a.names() {
            let (x, y) = (a.get(&name), b.get(&name));
            if name == MEM && shown.contains('.') {
                assert!(
                    y <= x && x - y <= x / 10 + 1,
                    "{name}({role}) {x} came back {y} via {shown:?}"
                );
            } else {
                assert_eq!(
                    x, y,
                    "{name}({role}) came back different via {shown:?} (from {text:?})"
                );
            }
        }
    }
    let _ = (r.get(CPUS), r.milli_cpus());
}

/// Sizes: `format_bytes` of a parsed size parses back to it when exact, and to at
/// most a tenth of its unit less when it shows a decimal.
fn size(text: &str) {
    let Ok(n) = parse_size(text) else {
        return;
    };
    let shown = format_bytes(n);
    let back = parse_size(&shown).unwrap_or_else(|e| panic!("{shown:?} does not parse: {e}"));
    if shown.contains('.') {
        assert!(
            back <= n && n - back <= n / 10 + 1,
            "{n} -> {shown} -> {back}"
        );
    } else {
        assert_eq!(back, n, "{text:?} -> {n} -> {shown} -> {back}");
    }
}

/// Durations: `format_duration` prints at most three decimals of its unit (ns
/// below 1 ms, µs below 1 s, ms above), so what it prints parses back to the
/// duration cut to that precision; `parse_duration_ms` agrees with `parse_duration`
/// to half a millisecond (each rounds from the text).
fn duration(text: &str) {
    let Ok(d) = parse_duration(text) else {
        assert!(
            parse_duration_ms(text).is_err() || text.trim().is_empty(),
            "{text:?}: parse_duration_ms takes what parse_duration refuses"
        );
        return;
    };
    let shown = format_duration(d);
    let back = parse_duration(&shown).unwrap_or_else(|e| panic!("{shown:?} does not parse: {e}"));
    let nanos = d.as_nanos();
    let cut = match nanos {
        0..1_000_000 => nanos,
        1_000_000..1_000_000_000 => nanos / 1_000 * 1_000,
        _ => nanos / 1_000_000 * 1_000_000,
    };
    assert_eq!(
        back.as_nanos(),
        cut,
        "{text:?} -> {d:?} -> {shown} -> {back:?}"
    );
    if let Ok(ms) = parse_duration_ms(text) {
        let diff = (u128::from(ms) * 1_000_000).abs_diff(nanos);
        assert!(diff <= 500_000, "{text:?}: {ms} ms but {d:?}");
    }
}

/// Constraints: what parses prints back (Display) to text that parses to the same
/// constraint; matching never panics, whatever the glob.
fn constraint(text: &str) {
    let (c, subject) = match text.split_once('\n') {
        Some((c, s)) => (c, s),
        None => (text, "edge-1.example"),
    };
    let Ok(parsed) = Constraint::parse(c) else {
        return;
    };
    let shown = parsed.to_string();
    assert_eq!(
        Constraint::parse(&shown).as_ref(),
        Ok(&parsed),
        "{c:?} -> {shown:?}"
    );
    let attrs = [("zone".to_string(), subject.to_string())]
        .into_iter()
        .collect();
    let _ = parsed.is_met(subject, &attrs);
    let _ = glob_match(c, subject);
}

/// Outbound allow-lists (one entry per line): what parses keeps its entries as
/// given, and an entry naming one scheme, host and port allows exactly that.
fn allow_list(text: &str) {
    let entries: Vec<&str> = text.split('\n').collect();
    let Ok(list) = OutboundAllowList::parse(&entries) else {
        return;
    };
    assert!(list.entries().eq(entries.iter().copied()));
    for e in &entries {
        let Some((scheme, rest)) = e.split_once("://") else {
            continue;
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().ok()),
            None => (rest, None),
        };
        let simple = matches!(scheme, "http" | "https")
            && !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'-' || b == b'.')
            && !host.starts_with(['.', '-'])
            && (port.is_some() || !rest.contains(':'));
        if simple {
            assert!(
                list.allows(scheme, host, port),
                "{e:?} does not allow {scheme}://{host}:{port:?}"
            );
        }
    }
    for e in &entries {
        if let Ok(uri) = e.parse::<http::Uri>() {
            let _ = list.allows_uri(&uri);
        }
    }
}

/// Cpu counts: milli-cpus format back to the same count.
fn cpus(text: &str) {
    let Some(m) = parse_cpus(text) else {
        return;
    };
    let shown = format_cpus(m);
    assert_eq!(parse_cpus(&shown), Some(m), "{text:?} -> {m} -> {shown}");
}
