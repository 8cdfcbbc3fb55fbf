//! Credentials never appear in connect errors: not in their `Display`, not
//! in their source chain, not in their `Debug`. Each backend is asked to
//! connect with a password to a closed port and with a malformed URL.

use std::error::Error as _;
use std::time::Duration;

const SECRET: &str = "hunter2secret";

/// Everything an error could print: Display of it and of each source, and Debug.
fn all_text(error: &busway::ConnectError) -> String {
    let mut text = format!("{error} | {error:?}");
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(&format!(" | {e} | {e:?}"));
        source = e.source();
    }
    text
}

async fn assert_redacted(url: &str) {
    let result = tokio::time::timeout(Duration::from_secs(60), busway::connect(url)).await;
    let Ok(result) = result else {
        panic!(
            "connecting to {} did not fail in time",
            busway::redact_url(url)
        );
    };
    match result {
        Ok(_) => panic!("{} unexpectedly connected", busway::redact_url(url)),
        Err(error) => {
            let text = all_text(&error);
            assert!(!text.contains(SECRET), "the password leaked: {text}");
        }
    }
}

#[tokio::test]
async fn connect_errors_never_show_passwords() {
    #[allow(unused_mut)]
    let mut urls = vec![format!("nope://user:{SECRET}@127.0.0.1:1/")];
    #[cfg(feature = "rabbitmq")]
    urls.extend([
        format!("amqp://guest:{SECRET}@127.0.0.1:1/%2f"),
        format!("amqp://guest:{SECRET}@[::1/%2f"),
    ]);
    #[cfg(feature = "redis")]
    urls.extend([
        format!("redis://:{SECRET}@127.0.0.1:1"),
        format!("redis://user:{SECRET}@127.0.0.1:notaport"),
    ]);
    #[cfg(feature = "postgres")]
    urls.extend([
        format!("postgres://postgres:{SECRET}@127.0.0.1:1/test"),
        format!("postgres://postgres:{SECRET}@127.0.0.1:notaport/test"),
    ]);
    #[cfg(feature = "nats")]
    urls.extend([
        format!("nats://user:{SECRET}@127.0.0.1:1"),
        format!("nats://user:{SECRET}@127.0.0.1:notaport"),
    ]);
    for url in urls {
        assert_redacted(&url).await;
    }
}
