//! A process for the crash tests to kill: publishes or consumes forever,
//! printing each confirmed operation (see the crate docs).

use std::io::Write;

use anyhow::{bail, Context};
use busway::{ConsumeOptions, Message, Publish, QueueName, QueueSpec};
use futures::stream::{self, StreamExt, TryStreamExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (role, url, queue) = match args.as_slice() {
        [role, url, queue, ..] => (role.as_str(), url.as_str(), QueueName::new(queue)?),
        _ => bail!("usage: busway-crash-child publish|consume URL QUEUE [FIRST_ID]"),
    };
    let transport = busway::connect(url).await?;
    transport
        .declare_queue(&QueueSpec::new(queue.clone()))
        .await?;
    let stdout = std::sync::Mutex::new(std::io::stdout());
    let print = |line: String| -> anyhow::Result<()> {
        let mut out = stdout
            .lock()
            .map_err(|_| anyhow::anyhow!("stdout lock poisoned"))?;
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    };
    match role {
        "publish" => {
            let first: u64 = args.get(3).context("publish needs FIRST_ID")?.parse()?;
            // 16 publishes in flight, as a service would have; each id is printed
            // only after its publish returned, i.e. it is on disk.
            stream::iter(first..)
                .map(|id| {
                    let publish =
                        Publish::to_queue(queue.clone(), Message::new("crash", id.to_string()));
                    let transport = transport.clone();
                    async move { transport.publish(publish).await.map(|()| id) }
                })
                .buffer_unordered(16)
                .map_err(anyhow::Error::from)
                .try_for_each(|id| async move { print(format!("P {id}")) })
                .await
        }
        "consume" => {
            let deliveries = transport
                .consume(&queue, ConsumeOptions::with_prefetch(32))
                .await?;
            deliveries
                .map_err(anyhow::Error::from)
                .map_ok(|delivery| async move {
                    let id = String::from_utf8_lossy(&delivery.message().payload).into_owned();
                    // Printed before the ack: if the process dies after the ack
                    // committed but before `A` is printed, the message is gone
                    // legitimately, and the test knows it was in this window.
                    print(format!("D {id}"))?;
                    delivery.ack().await?;
                    Ok::<_, anyhow::Error>(id)
                })
                .try_buffer_unordered(32)
                .try_for_each(|id| async move { print(format!("A {id}")) })
                .await
        }
        other => bail!("unknown role `{other}`"),
    }
}
