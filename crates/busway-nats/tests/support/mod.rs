//! A NATS server for one test: its own random prefix, whose streams are
//! deleted when the test ends.

#![allow(dead_code)]

/// The URL of the test server and a prefix no other test uses.
pub(crate) struct IsolatedNats {
    base: String,
    prefix: String,
}

impl IsolatedNats {
    /// `None` when `BUSWAY_TEST_NATS_URL` is unset (and brokers are not required).
    pub(crate) fn new() -> anyhow::Result<Option<Self>> {
        let Some(base) = busway_conformance::environment::broker_url("BUSWAY_TEST_NATS_URL")?
        else {
            return Ok(None);
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        Ok(Some(Self {
            base,
            prefix: format!("bwtest-{}", &id[..12]),
        }))
    }

    /// The server URL with this test's prefix.
    pub(crate) fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}prefix={}", self.base, self.prefix)
    }

    /// The server URL without a prefix.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// The prefix of this test.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The streams this test has left on the server.
    pub(crate) async fn streams_left(&self) -> anyhow::Result<Vec<String>> {
        streams_of(&self.base, &self.prefix).await
    }
}

async fn streams_of(base: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
    use futures::TryStreamExt;
    let client = async_nats::connect(base).await?;
    let js = async_nats::jetstream::new(client);
    let names: Vec<String> = js.stream_names().try_collect().await?;
    Ok(names
        .into_iter()
        .filter(|n| {
            n.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with(['_', '-']))
        })
        .collect())
}

/// Deletes every stream of a test's prefix.
async fn delete_streams(base: &str, prefix: &str) -> anyhow::Result<()> {
    let client = async_nats::connect(base).await?;
    let js = async_nats::jetstream::new(client);
    for name in streams_of(base, prefix).await? {
        js.delete_stream(&name).await?;
    }
    Ok(())
}

impl Drop for IsolatedNats {
    fn drop(&mut self) {
        let (base, prefix) = (self.base.clone(), self.prefix.clone());
        // Drop runs inside the test's runtime: clean up on a runtime of its own.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(delete_streams(&base, &prefix))
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not delete the test streams of {}: {e}", self.prefix),
            Err(_) => eprintln!("deleting the test streams of {} panicked", self.prefix),
        }
    }
}
