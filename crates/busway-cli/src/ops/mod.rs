//! The operations commands: queues, messaging from the shell, sagas, event
//! streams and projections. They share the connection settings
//! ([`settings`]) and the exit codes ([`exit`]).

use std::sync::Arc;

use anyhow::Context;
use busway::Transport;
use clap::Subcommand;

/// The settings and exit codes, as text for `--help` (a macro so `concat!` can use it).
macro_rules! settings_help {
    () => {
        "\
Settings: a flag wins over its environment variable, which wins over the
settings file, which wins over the default.
  --url              BUSWAY_URL             url             default sqlite://busway.db
  --store            BUSWAY_STORE           store           default: --url when it is sqlite:// or postgres://
  --management-url   BUSWAY_MANAGEMENT_URL  management_url  default http://<amqp host>:15672
  --config           BUSWAY_CONFIG          (the file)      default ./busway.toml when it exists
  request timeout    BUSWAY_TIMEOUT         timeout         default 5s

busway.toml:
  url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"
  store = \"postgres://postgres@127.0.0.1:5432/app\"
  management_url = \"http://127.0.0.1:15672\"
  timeout = \"10s\"

Exit codes: 0 ok; 1 error; 2 usage (bad flags, bad settings file); 3 not found
or error reply (unknown queue, saga, stream or dead letter; an RPC error reply);
4 backend unreachable (connection refused, RabbitMQ management API missing);
5 timeout (no RPC reply in time)."
    };
}

mod events;
pub(crate) mod exit;
mod messaging;
pub(crate) mod queues;
pub(crate) mod sagas;
pub(crate) mod settings;
pub(crate) mod stores;

use settings::Settings;

/// Examples under `busway --help`'s short form.
pub(crate) const EXAMPLES: &str = "Examples:
  busway queues
  busway publish order.created --json '{\"total\": 12.5}'
  busway subscribe 'order.*' --count 1
  busway request user_service get_user --json '{\"user_id\": \"u1\"}'
  busway task submit send_email --json '{\"to\": \"ann@example.com\"}'
  busway dlq list task_queue
  busway sagas list --status failed
  busway events tail --all
Settings (--url, BUSWAY_URL, busway.toml) and exit codes: busway --help";

/// `busway --help`: the examples, then the settings and exit codes.
pub(crate) const LONG_HELP: &str = concat!(
    "Examples:
  busway queues
  busway publish order.created --json '{\"total\": 12.5}'
  busway subscribe 'order.*' --count 1
  busway request user_service get_user --json '{\"user_id\": \"u1\"}'
  busway task submit send_email --json '{\"to\": \"ann@example.com\"}'
  busway dlq list task_queue
  busway sagas list --status failed
  busway events tail --all

",
    settings_help!()
);

/// The operations subcommands (flattened into `busway`'s).
#[derive(Subcommand, Debug)]
pub(crate) enum OpsCommand {
    /// List queues with their counts and rates (every backend).
    Queues(queues::QueuesArgs),
    /// Publish an event (reference shape) to a topic.
    Publish(messaging::PublishArgs),
    /// Print the events matching a topic pattern as JSON lines.
    Subscribe(messaging::SubscribeArgs),
    /// Call a service's method (RPC) and print the reply.
    Request(messaging::RequestArgs),
    /// Submit tasks to a work queue.
    Task(messaging::TaskArgs),
    /// List, show, retry and abort sagas.
    Sagas(sagas::SagasArgs),
    /// Read and follow event streams.
    Events(events::EventsArgs),
    /// Projection checkpoints and lag; reset a projection for a rebuild.
    Projections(events::ProjectionsArgs),
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  busway completions bash > /etc/bash_completion.d/busway
  busway completions zsh > \"${fpath[1]}/_busway\"
  busway completions fish > ~/.config/fish/completions/busway.fish")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// An open backend; on RabbitMQ also its concrete transport, for the
/// management API.
pub(crate) struct Connection {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) rabbitmq: Option<busway::rabbitmq::RabbitMqTransport>,
}

impl Connection {
    /// Connects to `settings.url`.
    pub(crate) async fn open(settings: &Settings) -> anyhow::Result<Self> {
        let url = &settings.url;
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        let context = || format!("connecting to {}", busway::redact_url(url));
        if matches!(scheme, "amqp" | "amqps") {
            let mut config = busway::rabbitmq::RabbitMqConfig::default();
            if let Some(management) = &settings.management_url {
                config = config.with_management_url(management.clone());
            }
            let rabbit = busway::rabbitmq::RabbitMqTransport::connect_with(url, config)
                .await
                .with_context(context)?;
            return Ok(Self {
                transport: Arc::new(rabbit.clone()),
                rabbitmq: Some(rabbit),
            });
        }
        let transport = busway::connect(url).await.with_context(context)?;
        Ok(Self {
            transport,
            rabbitmq: None,
        })
    }
}

/// Runs one operations command; `cli` builds the whole command line (for completions).
pub(crate) async fn run(command: OpsCommand, cli: fn() -> clap::Command) -> anyhow::Result<()> {
    match command {
        OpsCommand::Queues(args) => queues::run(args).await,
        OpsCommand::Publish(args) => messaging::publish(args).await,
        OpsCommand::Subscribe(args) => messaging::subscribe(args).await,
        OpsCommand::Request(args) => messaging::request(args).await,
        OpsCommand::Task(args) => messaging::task(args).await,
        OpsCommand::Sagas(args) => sagas::run(args).await,
        OpsCommand::Events(args) => events::events(args).await,
        OpsCommand::Projections(args) => events::projections(args).await,
        OpsCommand::Completions { shell } => {
            let mut command = cli();
            let name = command.get_name().to_owned();
            clap_complete::generate(shell, &mut command, name, &mut std::io::stdout());
            Ok(())
        }
    }
}
