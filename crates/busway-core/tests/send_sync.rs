//! Public types can cross threads and tasks.

use busway_core::*;

fn send_sync<T: Send + Sync>() {}
fn send_sync_static<T: Send + Sync + 'static>() {}

#[test]
fn public_types_are_send_and_sync() {
    send_sync::<Message>();
    send_sync::<Publish>();
    send_sync::<Delivery>();
    send_sync::<QueueSpec>();
    send_sync::<Binding>();
    send_sync::<Destination>();
    send_sync::<Capabilities>();
    send_sync::<QueueStats>();
    send_sync_static::<PublishError>();
    send_sync_static::<DeclareError>();
    send_sync_static::<ConsumeError>();
    send_sync_static::<SettleError>();
    send_sync_static::<StatsError>();
    send_sync_static::<ConnectError>();
    send_sync_static::<CodecError>();
    send_sync_static::<NameError>();
    send_sync::<std::sync::Arc<dyn Transport>>();
}
