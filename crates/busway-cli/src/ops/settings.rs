//! Where the operations commands connect: flags, then `BUSWAY_*`
//! environment variables, then `busway.toml`, then the defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use super::exit::{Exit, Failure};

/// The settings file looked for in the current directory.
pub(crate) const CONFIG_FILE: &str = "busway.toml";

/// The connection flags every operations command takes.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct Conn {
    /// The backend URL (sqlite://PATH, memory://, amqp://, postgres://, redis://).
    #[arg(long, global = true, env = "BUSWAY_URL", value_name = "URL")]
    pub(crate) url: Option<String>,
    /// Where sagas, events and projections are stored (sqlite:// or postgres://); defaults to --url.
    #[arg(long, global = true, env = "BUSWAY_STORE", value_name = "URL")]
    pub(crate) store: Option<String>,
    /// The RabbitMQ management API (queue listing); defaults to http://<amqp host>:15672.
    #[arg(long, global = true, env = "BUSWAY_MANAGEMENT_URL", value_name = "URL")]
    pub(crate) management_url: Option<String>,
    /// Read settings from this TOML file instead of ./busway.toml.
    #[arg(long, global = true, env = "BUSWAY_CONFIG", value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,
}

/// What `busway.toml` may hold.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileSettings {
    pub(crate) url: Option<String>,
    pub(crate) store: Option<String>,
    pub(crate) management_url: Option<String>,
    pub(crate) timeout: Option<String>,
}

/// The settings in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) url: String,
    pub(crate) store: Option<String>,
    pub(crate) management_url: Option<String>,
    pub(crate) timeout: Duration,
}

impl Conn {
    /// Resolves flags and environment (already merged by clap) over the file and defaults.
    pub(crate) fn settings(&self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None if Path::new(CONFIG_FILE).exists() => read_file(Path::new(CONFIG_FILE))?,
            None => FileSettings::default(),
        };
        let env_timeout = std::env::var("BUSWAY_TIMEOUT").ok();
        let timeout = match env_timeout.or(file.timeout) {
            Some(text) => parse_duration(&text).map_err(|e| Failure::msg(Exit::Usage, e))?,
            None => Duration::from_secs(5),
        };
        let url = self
            .url
            .clone()
            .or(file.url)
            .unwrap_or_else(|| busway::DEFAULT_URL.to_owned());
        let store = self.store.clone().or(file.store);
        Ok(Settings {
            url,
            store,
            management_url: self.management_url.clone().or(file.management_url),
            timeout,
        })
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileSettings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the settings file {}", path.display()))
        .map_err(|e| Failure::wrap(Exit::Usage, e))?;
    toml::from_str(&text).map_err(|e| {
        Failure::msg(
            Exit::Usage,
            format!("the settings file {} is not valid: {e}", path.display()),
        )
    })
}

impl Settings {
    /// The store URL: `--store`, else the bus URL when it names a database.
    pub(crate) fn store_url(&self) -> anyhow::Result<String> {
        if let Some(store) = &self.store {
            return Ok(store.clone());
        }
        let scheme = self.url.split_once("://").map_or("", |(s, _)| s);
        match scheme {
            "sqlite" | "postgres" | "postgresql" | "memory" => Ok(self.url.clone()),
            _ => Err(Failure::msg(
                Exit::Usage,
                format!(
                    "sagas, events and projections live in a database: give --store \
                     (sqlite://PATH or postgres://…); --url {} is not one",
                    busway::redact_url(&self.url)
                ),
            )),
        }
    }
}

/// `250ms`, `5s`, `2m`, `1h`, or plain seconds (`1.5`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 500ms, 5s, 2m or 1h"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit `{other}` (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn the_file_refuses_unknown_keys() {
        let parsed: Result<FileSettings, _> = toml::from_str("urll = \"memory://\"");
        assert!(parsed.is_err());
        let parsed: Result<FileSettings, _> = toml::from_str("url = \"memory://\"");
        assert_eq!(
            parsed.ok().and_then(|f| f.url).as_deref(),
            Some("memory://")
        );
    }

    #[test]
    fn the_store_defaults_to_a_database_url_only() {
        let mut settings = Settings {
            url: "sqlite://a.db".into(),
            store: None,
            management_url: None,
            timeout: Duration::from_secs(5),
        };
        assert_eq!(settings.store_url().ok().as_deref(), Some("sqlite://a.db"));
        settings.url = "amqp://guest:guest@127.0.0.1:5672/%2f".into();
        assert!(settings.store_url().is_err());
        settings.store = Some("postgres://db/app".into());
        assert_eq!(
            settings.store_url().ok().as_deref(),
            Some("postgres://db/app")
        );
    }
}
