//! URL helpers shared by the backends.

/// `url` with any password replaced by `***`, safe for logs and errors.
///
/// ```
/// assert_eq!(busway_core::redact_url("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
/// assert_eq!(busway_core::redact_url("sqlite://busway.db"), "sqlite://busway.db");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{masked}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_survive() {
        let cases = [
            ("amqps://u:p@h/v?x=1", "amqps://u:***@h/v?x=1"),
            (
                "redis://:secret@127.0.0.1:6379",
                "redis://:***@127.0.0.1:6379",
            ),
            ("postgres://user@host/db", "postgres://user@host/db"),
            ("amqp://u:p@ss@host/", "amqp://u:***@host/"),
            ("memory://", "memory://"),
            ("not a url", "not a url"),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_url(url), expected, "{url}");
        }
    }
}
