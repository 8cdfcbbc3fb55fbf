//! A Redis server for one test: its own random key prefix, whose keys are
//! deleted when the test ends.

#![allow(dead_code)]

/// The URL of the test server and a prefix no other test uses.
pub(crate) struct IsolatedRedis {
    base: String,
    prefix: String,
}

impl IsolatedRedis {
    /// `None` when `BUSWAY_TEST_REDIS_URL` is unset (and brokers are not required).
    pub(crate) fn new() -> anyhow::Result<Option<Self>> {
        let Some(base) = busway_conformance::environment::broker_url("BUSWAY_TEST_REDIS_URL")?
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

    /// The key prefix of this test.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many keys this test has left on the server.
    pub(crate) fn keys_left(&self) -> anyhow::Result<usize> {
        Ok(self.keys()?.len())
    }

    fn keys(&self) -> anyhow::Result<Vec<String>> {
        let client = redis::Client::open(self.base.as_str())?;
        let mut conn = client.get_connection()?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut conn)?;
        Ok(keys)
    }

    fn delete_keys(&self) -> anyhow::Result<()> {
        let keys = self.keys()?;
        if keys.is_empty() {
            return Ok(());
        }
        let client = redis::Client::open(self.base.as_str())?;
        let mut conn = client.get_connection()?;
        redis::cmd("DEL").arg(&keys).query::<()>(&mut conn)?;
        Ok(())
    }
}

impl Drop for IsolatedRedis {
    fn drop(&mut self) {
        if let Err(e) = self.delete_keys() {
            eprintln!("could not delete the test keys under {}: {e}", self.prefix);
        }
    }
}
